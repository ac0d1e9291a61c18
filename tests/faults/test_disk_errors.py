"""Disk errors: an unwritable run directory fails before training; a write failing mid-run is one clear line.

Tests run as root in CI, where chmod stops nothing: these use refusals that hold for root too
(sysfs, a path through a regular file, and a file-size limit that makes writes fail with EFBIG:
tests/helpers/disk_full_after_save.py).
"""

import sys

import pytest
import torch

from carbrand.checkpoint import load_training_checkpoint
from tests.helpers.fault_runs import complete_checkpoints, error_line, start_training, tree
from tests.helpers.paths import HELPERS
from tests.helpers.training_runs import read_metrics

QUICK_RUN = ("data.loader=torchvision", "train.max_steps=4", "train.log_every=1")


def unwritable_run_dir(kind: str, work):
    if kind == "read-only filesystem":
        return "/sys/kernel/carbrand-run"  # sysfs: no new files, even for root
    blocker = work / "a-file"
    blocker.write_text("a file, not a folder\n")
    return str(blocker / "run")


@pytest.mark.parametrize("kind", ["read-only filesystem", "parent is a file"])
def test_unwritable_run_dir_fails_before_training(kind, prepared_cars5, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    run_dir = unwritable_run_dir(kind, work)
    before = tree(work), tree(prepared_cars5)
    run = start_training(prepared_cars5, run_dir, *QUICK_RUN, logs=tmp_path / "logs")
    assert run.wait(timeout=300) == 1, run.stderr[-3000:]
    line = error_line(run.stderr)
    assert line.startswith(f"carbrand train: error: run directory {run_dir} is not writable ("), line
    assert run.stderr.strip() == line and run.stdout == "", "one line, before the first step"
    assert (tree(work), tree(prepared_cars5)) == before


@pytest.mark.slow
def test_write_failing_mid_run_is_one_line_and_keeps_the_previous_checkpoint(prepared_cars5, tmp_path):
    """step_2 is written; then files may not grow past 2 MB, so step_4's write fails (EFBIG, as on a full quota).
    Step 4 is not the run's last: there, validation and best/ come before the checkpoint, which then records them."""
    run_dir = tmp_path / "run"
    wrapper = [sys.executable, str(HELPERS / "disk_full_after_save.py"), "2", "2000000"]
    run = start_training(prepared_cars5, run_dir, *QUICK_RUN, "train.max_steps=6", "train.checkpoint_every_steps=2",
                         logs=tmp_path / "logs", wrapper=wrapper)
    assert run.wait(timeout=300) == 1, run.stderr[-3000:]
    line = error_line(run.stderr)
    assert line == (f"carbrand train: error: could not write {run_dir / 'checkpoints' / 'step_4'} (File too large); "
                    f"the previous copy, if any, is intact"), line
    assert complete_checkpoints(run_dir) == [2]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_2"], "no temporary left behind"
    assert (run_dir / "last").resolve() == (run_dir / "checkpoints" / "step_2").resolve()
    kept = load_training_checkpoint(run_dir / "last")  # the previous copy is intact: it loads, and it is step 2's
    assert kept.training_state["progress"]["step"] == 2
    assert all(torch.isfinite(t).all() for t in kept.model_state.values() if t.is_floating_point())
    assert 4 in [r["step"] for r in read_metrics(run_dir) if "train/loss" in r], "it trained on to step 4"
