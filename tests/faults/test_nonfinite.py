"""Non-finite loss: the run stops naming the step and keeps only checkpoints from before it; fp16 skips are not fatal."""

import re
import sys

import pytest
import torch

from carbrand.checkpoint import load_training_checkpoint
from tests.helpers.fault_runs import complete_checkpoints, error_line, start_training
from tests.helpers.paths import HELPERS
from tests.helpers.training_runs import read_metrics

# AdamW at lr 1e6 with no warm-up: the loss grows ~1e15, ~1e18, then turns NaN around step 4.
BLOW_UP = ("data.loader=torchvision", "optim.lr=1e6", "optim.warmup_epochs=0", "train.max_steps=12",
           "train.checkpoint_every_steps=2")


@pytest.mark.slow
@pytest.mark.parametrize("log_every", [1, 3], ids=["caught-when-logging", "caught-before-saving"])
def test_blow_up_stops_with_the_step_and_a_checkpoint_from_before(log_every, prepared_cars5, tmp_path):
    run_dir = tmp_path / "run"
    run = start_training(prepared_cars5, run_dir, *BLOW_UP, f"train.log_every={log_every}", logs=tmp_path / "logs")
    assert run.wait(timeout=300) == 1, run.stderr[-3000:]
    line = error_line(run.stderr)
    found = re.search(r"training diverged: the loss became NaN or inf at step (\d+); stopped without saving it\. "
                      r"Newest checkpoint, from before: (\S+) \(step (\d+)\)", line)
    assert found, line
    blown_up, newest = int(found.group(1)), int(found.group(3))
    assert complete_checkpoints(run_dir) and max(complete_checkpoints(run_dir)) == newest < blown_up
    assert found.group(2) == str(run_dir / "checkpoints" / f"step_{newest}")
    saved = load_training_checkpoint(run_dir / "checkpoints" / f"step_{newest}")
    assert all(torch.isfinite(t).all() for t in saved.model_state.values()), "the kept checkpoint must be usable"
    assert not (run_dir / "best").exists(), "a diverged model must never be exported"
    losses = [r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert losses and all(isinstance(loss, float) for loss in losses), losses  # NaN would be logged as null


@pytest.mark.slow
def test_fp16_scaler_skips_are_counted_and_logged_not_fatal(prepared_cars5, tmp_path):
    """fp16 needs CUDA: on a CPU the scaler's "skipped" answer is faked for steps 2 and 3 (see fake_scaler_skips.py)."""
    run_dir = tmp_path / "run"
    wrapper = [sys.executable, str(HELPERS / "fake_scaler_skips.py"), "2,3"]
    run = start_training(prepared_cars5, run_dir, "data.loader=torchvision", "train.max_steps=6", "train.log_every=1",
                         logs=tmp_path / "logs", wrapper=wrapper)
    assert run.wait(timeout=300) == 0, run.stderr[-3000:]
    records = {r["step"]: r for r in read_metrics(run_dir) if "train/loss" in r}
    # logged from the first skip on (a run with a real scaler logs it from step 1)
    assert [records[s].get("train/skipped_steps", 0) for s in range(1, 7)] == [0, 1, 2, 2, 2, 2]
    assert all("train/skipped_steps" in records[s] for s in range(2, 7))
    lr = [records[s]["train/lr"] for s in range(1, 7)]
    assert lr[0] == lr[1] == lr[2] < lr[3] < lr[4], lr  # warm-up: a skipped step does not advance the schedule
    assert "carbrand: done in 6 steps" in run.stdout
