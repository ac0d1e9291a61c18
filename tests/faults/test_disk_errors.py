"""Disk errors: an unwritable run directory fails before training; a write failing mid-run is one clear line.

Tests run as root in CI, where chmod stops nothing: these use refusals that hold for root too
(sysfs, a path through a regular file, and a file-size limit that makes writes fail with EFBIG).
"""

import resource

import pytest

from tests.helpers.fault_runs import complete_checkpoints, error_line, start_training, tree

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


def limit_file_size():
    """In the child: any file written past 2 MB fails with EFBIG (File too large), as on a full quota."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))


@pytest.mark.slow
def test_write_failing_mid_run_is_one_line_and_leaves_no_half_checkpoint(prepared_cars5, tmp_path):
    run_dir = tmp_path / "run"
    run = start_training(prepared_cars5, run_dir, *QUICK_RUN, "train.checkpoint_every_steps=2", logs=tmp_path / "logs",
                         preexec_fn=limit_file_size)
    assert run.wait(timeout=300) == 1, run.stderr[-3000:]
    line = error_line(run.stderr)
    assert line == (f"carbrand train: error: could not write {run_dir / 'checkpoints' / 'step_2'} (File too large); "
                    f"the previous copy, if any, is intact"), line
    assert complete_checkpoints(run_dir) == [] and not (run_dir / "last").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [], "no temporary left behind"
    assert [r for r in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in r], "it did train"
