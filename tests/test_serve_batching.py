"""InferenceBatcher on its own (in-process, a fake forward pass): batches, the max batch, the bounded queue, timeouts."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from carbrand.serve.batching import BatchingSettings, InferenceBatcher, InferenceTimeout, ServiceBusy


class RecordingForward:
    """run_batch stand-in: answers each crop with its source, records the batch sizes, can block or fail."""

    def __init__(self, delay_s: float = 0.0):
        self.batch_sizes: list[int] = []
        self.delay_s = delay_s
        self.release = threading.Event()
        self.release.set()
        self.fail_next = False

    def __call__(self, crops, sources):
        self.release.wait(10)
        time.sleep(self.delay_s)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("forward pass failed")
        self.batch_sizes.append(len(crops))
        return [f"answer for {source}" for source in sources]


def run(coroutine_function, forward: RecordingForward, **settings):
    async def main():
        batcher = InferenceBatcher(forward, BatchingSettings(**settings))
        await batcher.start()
        try:
            return await coroutine_function(batcher)
        finally:
            await batcher.stop()

    return asyncio.run(main())


def request(batcher: InferenceBatcher, name: str, images: int = 1):
    return batcher.predict([None] * images, [f"{name}/{n}" for n in range(images)])


def test_concurrent_requests_share_one_forward_pass():
    forward = RecordingForward()
    results = run(lambda b: asyncio.gather(*(request(b, f"r{n}") for n in range(5))), forward, max_wait_s=0.5)
    assert forward.batch_sizes == [5]
    assert [r.predictions for r in results] == [[f"answer for r{n}/0"] for n in range(5)]
    assert all(r.batch_images == 5 for r in results)


def test_batching_off_runs_each_request_alone():
    forward = RecordingForward()
    run(lambda b: asyncio.gather(*(request(b, f"r{n}") for n in range(5))), forward, enabled=False, max_wait_s=0.5)
    assert forward.batch_sizes == [1, 1, 1, 1, 1]


def test_a_batch_never_passes_the_max_and_no_request_is_lost():
    forward = RecordingForward()
    results = run(lambda b: asyncio.gather(*(request(b, f"r{n}", images=3) for n in range(5))), forward,
                  max_batch_images=7, max_wait_s=0.5)
    assert max(forward.batch_sizes) <= 7 and sum(forward.batch_sizes) == 15
    assert [r.predictions for r in results] == [[f"answer for r{n}/{i}" for i in range(3)] for n in range(5)]


def test_a_full_queue_refuses_at_once():
    forward = RecordingForward()
    forward.release.clear()  # the first request's forward pass hangs until released

    async def scenario(batcher):
        first = asyncio.create_task(request(batcher, "first"))
        await asyncio.sleep(0.1)  # the worker took it: the queue is empty again
        second = asyncio.create_task(request(batcher, "second"))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(ServiceBusy):
            await request(batcher, "third")
        refused_after = time.monotonic() - started
        forward.release.set()
        await asyncio.gather(first, second)
        return refused_after

    assert run(scenario, forward, queue_size=1, max_wait_s=0.0) < 0.05


def test_a_late_request_times_out_and_the_worker_goes_on():
    forward = RecordingForward(delay_s=0.4)

    async def scenario(batcher):
        with pytest.raises(InferenceTimeout):
            await request(batcher, "slow")
        forward.delay_s = 0.0
        await asyncio.sleep(0.5)
        return await request(batcher, "after")

    result = run(scenario, forward, timeout_s=0.2, max_wait_s=0.0)
    assert result.predictions == ["answer for after/0"]


def test_a_failed_forward_pass_fails_only_its_requests():
    forward = RecordingForward()
    forward.fail_next = True

    async def scenario(batcher):
        with pytest.raises(RuntimeError, match="forward pass failed"):
            await request(batcher, "unlucky")
        return await request(batcher, "next")

    assert run(scenario, forward, max_wait_s=0.0).predictions == ["answer for next/0"]
