"""Concurrent requests share forward passes: a bounded queue, a max batch, a short max wait, a per-request timeout.

One worker task per server process takes the first waiting request, then keeps taking
requests until the batch holds `max_batch_images` images or `max_wait_s` has passed, and
runs them as one forward pass on its own thread (the event loop keeps accepting uploads
meanwhile). Requests that arrive while a batch runs wait in the queue and form the next
batch, so under load batches fill up without any waiting. With batching off, each request
is its own forward pass: the comparison in docs/SERVING.md.

A full queue refuses a request at once (ServiceBusy, HTTP 503) instead of letting latency
grow without bound; a request not answered within `timeout_s` gets InferenceTimeout (HTTP 504)
and is dropped from its batch if it has not started.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the settings travel to uvicorn's worker processes, which must read them without importing torch
    import torch


@dataclass(frozen=True)
class BatchingSettings:
    enabled: bool = True
    max_batch_images: int = 32  # images per forward pass
    max_wait_s: float = 0.005  # how long a lone request waits for company: a few ms, well under one forward pass
    queue_size: int = 64  # requests waiting; one more is refused with 503
    timeout_s: float = 30.0  # per request, from queueing to answer


class ServiceBusy(Exception):
    pass


class InferenceTimeout(Exception):
    pass


@dataclass
class BatchResult:
    predictions: list  # carbrand.inference.predict.Prediction, one per crop, in order
    batch_images: int  # images in the forward pass this request shared


@dataclass
class _Job:
    crops: list[torch.Tensor]
    sources: list[str]
    future: asyncio.Future = field(repr=False)


# run_batch(crops, sources) -> one prediction per crop, in order
RunBatch = Callable[[list["torch.Tensor"], list[str]], list]


class InferenceBatcher:
    """Start in the server's event loop (`start`), `await predict(...)` from request handlers, `stop` at shutdown."""

    def __init__(self, run_batch: RunBatch, settings: BatchingSettings):
        self.run_batch, self.settings = run_batch, settings
        self.queue: asyncio.Queue[_Job] | None = None
        self.worker: asyncio.Task | None = None
        self.held_back: _Job | None = None  # a job that would have overfilled the last batch: first in the next
        self.batches_run = 0
        # One inference thread: the model is not shared between concurrent forward passes.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

    async def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.settings.queue_size)
        self.worker = asyncio.create_task(self._serve_forever())

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)
        self.executor.shutdown(wait=True, cancel_futures=True)

    def waiting(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    async def predict(self, crops: list[torch.Tensor], sources: list[str]) -> BatchResult:
        assert self.queue is not None, "InferenceBatcher.start() was not awaited"
        job = _Job(crops, sources, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise ServiceBusy(f"{self.settings.queue_size} requests are already waiting; retry shortly") from None
        try:
            # Cancelling the future on timeout is what tells the worker to skip this job.
            return await asyncio.wait_for(job.future, self.settings.timeout_s)
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
            raise InferenceTimeout(f"no answer within {self.settings.timeout_s:g} s") from None

    async def run_alone(self, function, *args):
        """`function(*args)` on the inference thread: never at the same time as a batch's forward pass (Grad-CAM
        hooks the model and needs gradients, which a concurrent forward pass would disturb)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def _serve_forever(self) -> None:
        while True:
            jobs = await self._next_batch()
            jobs = [job for job in jobs if not job.future.done()]  # timed out while waiting
            if not jobs:
                continue
            crops = [crop for job in jobs for crop in job.crops]
            sources = [source for job in jobs for source in job.sources]
            try:
                predictions = await asyncio.get_running_loop().run_in_executor(self.executor, self.run_batch, crops, sources)
            except Exception as error:  # a failed forward pass fails its requests, never the worker
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            self.batches_run += 1
            start = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(BatchResult(predictions[start:start + len(job.crops)], len(crops)))
                start += len(job.crops)

    async def _next_batch(self) -> list[_Job]:
        first, self.held_back = self.held_back or await self.queue.get(), None
        jobs, images = [first], len(first.crops)
        if not self.settings.enabled:
            return jobs
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.max_wait_s
        while images < self.settings.max_batch_images:
            try:
                job = self.queue.get_nowait()  # already waiting: no need to wait at all
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
                    break
            if images + len(job.crops) > self.settings.max_batch_images:
                self.held_back = job
                break
            jobs.append(job)
            images += len(job.crops)
        return jobs
