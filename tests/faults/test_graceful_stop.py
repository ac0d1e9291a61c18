"""SIGTERM / SIGUSR1 to one rank of two: both stop together at a step boundary, save one checkpoint, exit 143.
A second SIGTERM/SIGINT, or the stop deadline, ends a stop that cannot happen soon: at once, without a checkpoint.

The ranks are started the way srun starts tasks (one process per rank, RANK/WORLD_SIZE/MASTER_*
set), so each rank's own exit code is seen. Under `accelerate launch`/torchrun the workers exit
143 the same way, and the launcher reports them as failed (its own exit code is 1).
Resuming after such a stop: tests/test_train.py::test_resume_after_a_stop_matches_an_uninterrupted_run.
"""

import os
import signal
import sys
import time

import pytest
import torch

from carbrand.checkpoint import find_resume_checkpoint, load_training_checkpoint, step_checkpoints
from carbrand.training.preemption import ECHO_SECONDS
from tests.helpers.fault_runs import TINY, complete_checkpoints, logged_steps, start_ranks, start_training, wait_until
from tests.helpers.paths import HELPERS
from tests.helpers.stall_during_save import STALLED_LINE
from tests.helpers.subprocesses import assert_ok
from tests.helpers.training_runs import run_training

LOG_EVERY = 2


@pytest.mark.slow
@pytest.mark.parametrize("signal_number, rank", [(signal.SIGTERM, 1), (signal.SIGUSR1, 0)],
                         ids=["SIGTERM-to-rank-1", "SIGUSR1-to-rank-0"])
def test_signal_to_one_rank_stops_all_ranks_with_a_checkpoint(signal_number, rank, prepared_cars5, tmp_path):
    run_dir = tmp_path / "run"
    ranks = start_ranks(prepared_cars5, run_dir, "data.loader=torchvision", "train.epochs=2",
                        f"train.log_every={LOG_EVERY}", logs=tmp_path / "logs")
    try:
        wait_until(lambda: max(logged_steps(run_dir), default=0) >= 2, ranks, what="step 2")
        os.kill(ranks[rank].process.pid, signal_number)
        codes = [r.wait(timeout=120) for r in ranks]
    finally:
        for r in ranks:
            r.kill()
    assert codes == [143, 143], [r.stderr[-2000:] for r in ranks]
    for r in ranks:
        assert "Traceback" not in r.stderr, r.stderr[-3000:]

    stopped_at = complete_checkpoints(run_dir)[-1]
    assert stopped_at < 16 and stopped_at % LOG_EVERY == 0, "mid-epoch, at a step where the ranks compare notes"
    assert max(logged_steps(run_dir)) == stopped_at, "nothing trained after the agreed stop"
    saved = load_training_checkpoint(run_dir / "checkpoints" / f"step_{stopped_at}")
    assert saved.training_state["progress"]["step"] == stopped_at and saved.training_state["world_size"] == 2
    assert all(torch.isfinite(t).all() for t in saved.model_state.values())
    said = ranks[0].stdout + ranks[1].stdout
    who = signal.Signals(signal_number).name if rank == 0 else "a signal to another rank"
    assert said.count("carbrand: stop requested") == 1, said  # the main process speaks for all
    assert f"stop requested ({who}); checkpoint saved at step {stopped_at}; resume with train.resume=auto" in said


# The stalled runs: a checkpoint every 2 steps; the one at step 4 stalls half-written, in C code (see
# tests/helpers/stall_during_save.py), and the next log step is out of reach: no graceful stop can happen.
SAVE_EVERY, STALLED_STEP = 2, 4
PROMPT_S = 6  # from the signal that must end the run to its exit: a few seconds on a loaded 2-core machine


def start_stalled_run(prepared, tmp_path, *overrides):
    run_dir = tmp_path / "run"
    run = start_training(prepared, run_dir, "train.log_every=100000", f"train.checkpoint_every_steps={SAVE_EVERY}",
                         "train.keep_checkpoints=5", *overrides, logs=tmp_path / "logs",
                         wrapper=[sys.executable, str(HELPERS / "stall_during_save.py"), str(STALLED_STEP)],
                         # Ctrl-C must raise KeyboardInterrupt, as in a terminal, even if the test runner ignores SIGINT
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_until(lambda: STALLED_LINE in run.stderr, run, what=f"the stalled write of step_{STALLED_STEP}")
    return run, run_dir


def assert_only_complete_checkpoints_visible(run_dir, stderr: str) -> None:
    """step_2 complete and named as the resume point; the step_4 being written is a hidden temporary only."""
    saved = run_dir / "checkpoints" / f"step_{SAVE_EVERY}"
    assert [path for _, path in step_checkpoints(run_dir)] == [saved] == [find_resume_checkpoint(run_dir, "auto")]
    assert complete_checkpoints(run_dir) == [SAVE_EVERY]
    others = [p.name for p in (run_dir / "checkpoints").iterdir() if p != saved]
    assert others and all(name.startswith(f".tmp-step_{STALLED_STEP}-") for name in others), others
    assert (run_dir / "last").resolve() == saved.resolve()
    assert f"exiting now without a stop checkpoint; train.resume=auto will resume from {saved} (step {SAVE_EVERY})" \
        in stderr, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("signal_number, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_second_signal_ends_the_run_at_once_even_inside_c_code(signal_number, exit_code, prepared_cars5, tmp_path):
    run, run_dir = start_stalled_run(prepared_cars5, tmp_path)
    try:
        os.kill(run.process.pid, signal_number)
        time.sleep(ECHO_SECONDS + 0.5)  # sooner, it would count as the same request arriving by another route
        assert run.process.poll() is None, "the first signal must not end the run at once"
        sent = time.monotonic()
        os.kill(run.process.pid, signal_number)
        code = run.wait(timeout=60)
        seconds = time.monotonic() - sent
    finally:
        run.kill()
    assert code == exit_code, run.stderr[-3000:]
    assert seconds < PROMPT_S, seconds
    assert f"a second stop signal ({signal.Signals(signal_number).name})" in run.stderr
    assert_only_complete_checkpoints_visible(run_dir, run.stderr)


@pytest.mark.slow
def test_stop_deadline_ends_a_stop_that_cannot_happen_then_resume_ignores_the_half_checkpoint(prepared_cars5, tmp_path):
    deadline_s = 2
    run, run_dir = start_stalled_run(prepared_cars5, tmp_path, f"train.stop_deadline_s={deadline_s}")
    try:
        sent = time.monotonic()
        os.kill(run.process.pid, signal.SIGTERM)
        code = run.wait(timeout=60)
        seconds = time.monotonic() - sent
    finally:
        run.kill()
    assert code == 143, run.stderr[-3000:]
    assert deadline_s <= seconds < deadline_s + PROMPT_S, seconds
    assert f"the stop on SIGTERM has not finished within train.stop_deadline_s={deadline_s} s" in run.stderr
    assert_only_complete_checkpoints_visible(run_dir, run.stderr)

    resumed = run_training(prepared_cars5, run_dir, *TINY, f"train.max_steps={STALLED_STEP + 2}",
                           f"train.checkpoint_every_steps={SAVE_EVERY}")
    assert_ok(resumed)
    checkpoints = run_dir / "checkpoints"
    assert f"resumed from {checkpoints / f'step_{SAVE_EVERY}'} at step {SAVE_EVERY}" in resumed.stdout
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")], "the next save removes the leftover"
