"""A rank dies (SIGKILL) or freezes (SIGSTOP) in a 2-process gloo run: the other fails fast, naming it.

Never longer than `train.collective_timeout_s` plus the few seconds it takes to tell which
peer went silent (carbrand/heartbeat.py).
"""

import signal
import time

import pytest

from tests.helpers.fault_runs import error_line, logged_steps, start_ranks, start_training, wait_until, worker_ranks

TIMEOUT_S = 15  # train.collective_timeout_s in these runs (a legitimate wait here is a few seconds)
SLACK_S = 15  # naming the silent rank (3 s), tearing down loaders, a busy CI machine
COMMON = ("data.loader=torchvision", "train.epochs=3", "train.log_every=1", f"train.collective_timeout_s={TIMEOUT_S}")


@pytest.mark.slow
def test_killed_rank_under_accelerate_launch(prepared_cars5, tmp_path):
    run_dir = tmp_path / "run"
    launcher = start_training(prepared_cars5, run_dir, *COMMON, logs=tmp_path / "logs", num_processes=2)
    try:
        workers = worker_ranks(launcher, world_size=2)
        wait_until(lambda: max(logged_steps(run_dir), default=0) >= 2, launcher, what="step 2")
        killed_at = time.monotonic()
        workers[1].send_signal(signal.SIGKILL)
        workers[0].wait(timeout=TIMEOUT_S + SLACK_S)  # raises if the survivor outlives the bound
        survivor_seconds = time.monotonic() - killed_at
        assert launcher.wait(timeout=60) != 0
    finally:
        launcher.kill()
    assert survivor_seconds < TIMEOUT_S + SLACK_S
    output = launcher.stderr
    assert "[rank0]: Traceback" not in output, output[-4000:]
    assert "carbrand train: error: rank 0 stops: rank 1 stopped responding (died or froze)" in output, output[-4000:]
    # the launcher's own report names it too
    assert "rank      : 1 (local_rank: 1)" in output and "Signal 9 (SIGKILL)" in output, output[-3000:]


@pytest.mark.slow
def test_frozen_rank_times_out_after_collective_timeout(prepared_cars5, tmp_path):
    """SIGSTOP: the peer's socket stays open, so only the collective timeout can end the wait."""
    run_dir = tmp_path / "run"
    ranks = start_ranks(prepared_cars5, run_dir, *COMMON, logs=tmp_path / "logs")
    try:
        wait_until(lambda: max(logged_steps(run_dir), default=0) >= 2, ranks, what="step 2")
        frozen_at = time.monotonic()
        ranks[1].process.send_signal(signal.SIGSTOP)
        code = ranks[0].wait(timeout=TIMEOUT_S + SLACK_S)
        survivor_seconds = time.monotonic() - frozen_at
    finally:
        for run in ranks:
            run.kill()
    assert code == 1
    assert TIMEOUT_S - 5 < survivor_seconds < TIMEOUT_S + SLACK_S, survivor_seconds
    line = error_line(ranks[0].stderr)
    assert "rank 0 stops: rank 1 stopped responding (died or froze)" in line and "Timed out" in line, line
