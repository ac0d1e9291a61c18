"""Non-finite loss or weights: the run stops at the next sync point (log, validation or checkpoint), naming the step, and
keeps only checkpoints from before it; fp16 skips are not fatal."""

import math
import re
import sys

import pytest
import torch

from carbrand.checkpoint import load_training_checkpoint
from tests.helpers.fault_runs import complete_checkpoints, error_line, start_training
from tests.helpers.paths import HELPERS
from tests.helpers.training_runs import read_metrics

# AdamW at lr 1e6 with no warm-up: BatchNorm's running variance overflows to inf at step 3 (weights and loss
# still finite), the loss turns NaN a step later. Every step is logged, every second one saved: a blow-up off
# the checkpoint steps can only be caught by the check at the log.
BLOW_UP = ("data.loader=torchvision", "optim.lr=1e6", "optim.warmup_epochs=0", "train.max_steps=12",
           "train.checkpoint_every_steps=2", "train.log_every=1")
# A sane run whose loss or weights tests/helpers/inject_nonfinite.py makes NaN/inf at one chosen step. Sync
# points: checkpoints at 2, 4, 6; validation at 3, 6; logs at 5 (and at the end).
SANE = ("data.loader=torchvision", "train.max_steps=6", "train.checkpoint_every_steps=2", "train.eval_every_steps=3",
        "train.log_every=5")
DIVERGED = re.compile(r"training diverged: the (loss became NaN or inf at step (\d+)|weights became NaN or inf by step "
                      r"(\d+)); stopped without saving it\. Newest checkpoint, from before: (\S+) \(step (\d+)\)")


def run_until_it_diverges(prepared, tmp_path, mode: str, step: int, *overrides: str) -> tuple[re.Match, int]:
    """The run through inject_nonfinite.py: the stop's error line, parsed, and the step whose check raised."""
    run_dir, caught_file = tmp_path / "run", tmp_path / "caught_at_step"
    wrapper = [sys.executable, str(HELPERS / "inject_nonfinite.py"), mode, str(step), str(caught_file)]
    run = start_training(prepared, run_dir, *overrides, logs=tmp_path / "logs", wrapper=wrapper)
    assert run.wait(timeout=300) == 1, run.stderr[-3000:]
    line = error_line(run.stderr)
    found = DIVERGED.search(line)
    assert found, line
    newest = int(found.group(5))
    assert complete_checkpoints(run_dir) and max(complete_checkpoints(run_dir)) == newest
    assert found.group(4) == str(run_dir / "checkpoints" / f"step_{newest}")
    saved = load_training_checkpoint(run_dir / "checkpoints" / f"step_{newest}")
    assert all(torch.isfinite(t).all() for t in saved.model_state.values()), "the kept checkpoint must be usable"
    return found, int(caught_file.read_text())


def logged_losses(run_dir) -> dict[int, float]:
    losses = {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}
    assert all(isinstance(loss, float) and math.isfinite(loss) for loss in losses.values()), losses  # NaN: null
    return losses


@pytest.mark.slow
def test_blow_up_is_caught_at_the_log_of_its_step_with_a_checkpoint_from_before(prepared_cars5, tmp_path):
    found, caught_at = run_until_it_diverges(prepared_cars5, tmp_path, "none", 0, *BLOW_UP)
    blown_up, newest = int(found.group(2) or found.group(3)), int(found.group(5))
    # Which step blows up depends on float rounding (3 or 4 on different machines); every step is logged, so
    # it is caught at its own step either way, before logging (and, on a checkpoint step, saving) it.
    assert caught_at == blown_up and newest < blown_up
    assert sorted(logged_losses(tmp_path / "run")) == list(range(1, blown_up)), "nothing logged from the blown-up step"
    assert not (tmp_path / "run" / "best").exists(), "a diverged model must never be exported"


@pytest.mark.slow
def test_nan_loss_is_caught_before_the_next_checkpoint(prepared_cars5, tmp_path):
    """Step 3's loss is NaN, its weights finite; the next sync point is step 4's checkpoint, which must not be written."""
    found, caught_at = run_until_it_diverges(prepared_cars5, tmp_path, "loss", 3, *SANE, "train.eval_every_steps=0")
    assert (found.group(2), caught_at, found.group(5)) == ("3", 4, "2"), found.group(0)
    assert logged_losses(tmp_path / "run") == {}  # the first log would have been at step 5


@pytest.mark.slow
def test_nan_loss_is_caught_at_the_log_that_would_record_it(prepared_cars5, tmp_path):
    """Step 5's loss is NaN: step 5 is a log and nothing else (checkpoints at 4, 6), so only the log's check can see it."""
    found, caught_at = run_until_it_diverges(prepared_cars5, tmp_path, "loss", 5, *SANE)
    assert (found.group(2), caught_at, found.group(5)) == ("5", 5, "4"), found.group(0)
    assert logged_losses(tmp_path / "run") == {}, "the NaN step must not be logged"


@pytest.mark.slow
def test_infinite_weights_with_a_finite_loss_are_caught_before_validation(prepared_cars5, tmp_path):
    """The head gets an inf weight right after step 3 (its loss finite): step 3's validation must not run on it."""
    found, caught_at = run_until_it_diverges(prepared_cars5, tmp_path, "weights", 3, *SANE)
    assert (found.group(3), caught_at, found.group(5)) == ("3", 3, "2"), found.group(0)
    assert not [r for r in read_metrics(tmp_path / "run") if "val/accuracy" in r], "validated diverged weights"
    assert not (tmp_path / "run" / "best").exists(), "a diverged model must never be exported"


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
