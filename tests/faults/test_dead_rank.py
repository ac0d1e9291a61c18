"""A rank dies (SIGKILL) or freezes (SIGSTOP) in a 2-process gloo run: the other fails fast, naming it.

Never longer than `train.collective_timeout_s` plus the few seconds it takes to tell which
peer went silent (carbrand/training/heartbeat.py). The tests check the messages and their order; the
time limits are generous (a loaded 2-core CI machine stretches every second of it), there only
to fail a run that would hang.
"""

import signal
import time

import pytest

from tests.helpers.fault_runs import error_line, logged_steps, start_ranks, start_training, wait_until, worker_ranks

TIMEOUT_S = 15  # train.collective_timeout_s in these runs (a legitimate wait here is a few seconds)
SLACK_S = 90  # naming the silent rank (3 s), tearing down loaders; several times over on a busy CI machine
COMMON = ("data.loader=torchvision", "train.epochs=3", "train.log_every=1", f"train.collective_timeout_s={TIMEOUT_S}")


@pytest.mark.slow
def test_killed_rank_under_accelerate_launch(prepared_cars5, tmp_path):
    run_dir = tmp_path / "run"
    launcher = start_training(prepared_cars5, run_dir, *COMMON, logs=tmp_path / "logs", num_processes=2)
    try:
        workers = worker_ranks(launcher, world_size=2)
        wait_until(lambda: max(logged_steps(run_dir), default=0) >= 2, launcher, what="step 2")
        workers[1].send_signal(signal.SIGKILL)
        workers[0].wait(timeout=TIMEOUT_S + SLACK_S)  # raises if the survivor hangs
        assert launcher.wait(timeout=60) == 1  # accelerate launch: 1 when a worker failed
    finally:
        launcher.kill()
    output = launcher.stderr
    assert "[rank0]: Traceback" not in output, output[-4000:]
    survivor = output.find("carbrand train: error: rank 0 stops: rank 1 stopped responding (died or froze)")
    assert survivor >= 0, output[-4000:]
    # the launcher's own report names it too, after the survivor has said why it stopped
    report = output.find("rank      : 1 (local_rank: 1)")
    assert survivor < report and "Signal 9 (SIGKILL)" in output[report:], output[-3000:]
    # and the survivor's entry in that report is its one line, from the error file torchrun's agent gave it
    assert "traceback : carbrand train: error: rank 0 stops: rank 1 stopped responding" in output, output[-3000:]


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
    # ended by the collective timeout, not by anything sooner: its wait began at most a step before the freeze
    assert survivor_seconds > TIMEOUT_S - 5, survivor_seconds
    line = error_line(ranks[0].stderr)
    assert "rank 0 stops: rank 1 stopped responding (died or froze)" in line and "Timed out" in line, line
