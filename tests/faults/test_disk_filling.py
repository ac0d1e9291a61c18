"""A disk that fills up mid-run, on a real small tmpfs (we run as root): the checkpoint before it warns with the
free and needed bytes, the save that no longer fits fails in one line, and the previous checkpoint stays loadable.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

import pytest

from carbrand.checkpoint import load_training_checkpoint
from tests.helpers.fault_runs import complete_checkpoints, error_line, start_training, wait_until

# resnet18 for 5 brands: 45 MB of weights + 90 MB of AdamW state, about 134 MB a checkpoint
TMPFS_MB = 400
LEFT_FREE_MB = 60  # after the filler: less than one checkpoint


@pytest.fixture
def small_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:  # also when the test fails: never leave a mount behind
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


@pytest.mark.slow
def test_filling_disk_warns_before_the_failed_save_and_keeps_the_previous_checkpoint(prepared_cars5, small_tmpfs, tmp_path):
    run_dir = small_tmpfs / "run"
    run = start_training(prepared_cars5, run_dir, "data.loader=torchvision", "train.max_steps=12", "train.log_every=1",
                         "train.checkpoint_every_steps=4", logs=tmp_path / "logs")
    try:
        wait_until(lambda: complete_checkpoints(run_dir) == [4], run, what="the first checkpoint")
        os.kill(run.process.pid, signal.SIGSTOP)  # the disk fills between two checkpoints (another job's files)
        assert not list((run_dir / "checkpoints").glob(".tmp-*")), "stopped inside the next save: too late to fill"
        free = shutil.disk_usage(small_tmpfs).free
        with (small_tmpfs / "other_jobs_data.bin").open("wb") as filler:
            os.posix_fallocate(filler.fileno(), 0, free - LEFT_FREE_MB * 2**20)
        os.kill(run.process.pid, signal.SIGCONT)
        assert run.wait(timeout=300) == 1, run.stderr[-3000:]
    finally:
        run.kill()

    # (the progress bar may share the warning's line)
    warnings = [line[line.index("carbrand: warning"):] for line in run.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, run.stderr[-3000:]
    found = re.match(rf"carbrand: warning: {run_dir} has (\d+) bytes free \(.*\), less than the (\d+) bytes .* a checkpoint "
                     rf"needs \(twice the last one, .*\)", warnings[0])
    assert found, warnings[0]
    step_4_bytes = sum(p.stat().st_size for p in (run_dir / "checkpoints" / "step_4").iterdir())
    free_bytes, needed_bytes = map(int, found.groups())
    assert needed_bytes == 2 * step_4_bytes and abs(free_bytes - LEFT_FREE_MB * 2**20) < 2**20, warnings[0]

    line = error_line(run.stderr)
    assert line == (f"carbrand train: error: could not write {run_dir / 'checkpoints' / 'step_8'} (No space left on device); "
                    f"the previous copy, if any, is intact"), line
    assert complete_checkpoints(run_dir) == [4] and os.readlink(run_dir / "last") == "checkpoints/step_4"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_4"], "no half-written checkpoint left"
    resumable = load_training_checkpoint(run_dir / "last")
    assert resumable.training_state["progress"]["step"] == 4 and resumable.model_state
