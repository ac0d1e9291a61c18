"""Hard kill (`kill -9`) mid-epoch, then `train.resume: auto`: same optimizer steps, same result as a run never killed.

(SIGUSR1 followed by a resume is tests/test_train.py::test_resume_after_a_stop_matches_an_uninterrupted_run.)
"""

import signal
import sys

import pytest

from tests.helpers.fault_runs import TINY, complete_checkpoints, fault_environment, logged_steps, start_training
from tests.helpers.paths import HELPERS
from tests.helpers.subprocesses import assert_ok
from tests.helpers.training_runs import last_value, read_metrics, run_training

# 16 steps in the one epoch (266 images, batch 16): the kill comes right after step 6, between checkpoints, sent by
# the process to itself (tests/helpers/rank_state_probe.py), so it lands there every time, however loaded the machine.
# The torchvision loader draws each crop from (seed, rank, epoch, position), so a resumed run sees
# exactly the crops it would have seen and the numbers can be compared step by step. (DALI resumes
# the same sample order, but its crops restart the epoch's random stream: close, not identical.)
COMMON = (*TINY, "data.loader=torchvision", "train.epochs=1", "train.log_every=1",
          "train.checkpoint_every_steps=4", "train.seed=5")


def train_losses(records: list[dict]) -> dict[int, float]:
    """step -> loss; a step logged twice (before the kill and after the resume) keeps the later value."""
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_matches_an_uninterrupted_run(prepared_cars5, tmp_path):
    straight = tmp_path / "straight"
    result = run_training(prepared_cars5, straight, *COMMON, env=fault_environment())
    assert_ok(result)
    total = last_value(read_metrics(straight), "run/total_steps")

    killed = tmp_path / "killed"
    wrapper = [sys.executable, str(HELPERS / "rank_state_probe.py"), str(tmp_path / "probe"), "--signal-at-step=SIGKILL:6"]
    run = start_training(prepared_cars5, killed, *COMMON, logs=tmp_path / "killed-logs", wrapper=wrapper)
    assert run.wait(timeout=300) == -signal.SIGKILL, run.stderr[-3000:]
    newest = complete_checkpoints(killed)[-1]
    assert (newest, max(logged_steps(killed))) == (4, 5), "killed after step 6: before its log, after step 4's checkpoint"

    result = run_training(prepared_cars5, killed, *COMMON, env=fault_environment())  # train.resume: auto
    assert_ok(result)
    assert f"resumed from {killed / 'checkpoints' / f'step_{newest}'} at step {newest}" in result.stdout

    records, reference = read_metrics(killed), read_metrics(straight)
    restart = next(i for i, r in enumerate(records) if r.get("run/restarts") == 1)
    resumed_steps = sorted(train_losses(records[restart:]))
    assert resumed_steps == list(range(newest + 1, total + 1)), "steps after the restart: exactly the missing ones"
    assert last_value(records, "run/total_steps") == total
    # Same seed, same data order and crops from the checkpoint's position: the same numbers, up to float noise.
    resumed, uninterrupted = train_losses(records[restart:]), train_losses(reference)
    for step in resumed_steps:
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-3, abs=1e-4), step
    assert last_value(records, "val/accuracy") == pytest.approx(last_value(reference, "val/accuracy"), abs=0.04)
    assert (killed / "best" / "model.safetensors").is_file()
