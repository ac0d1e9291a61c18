"""Readers during writes: predict/evaluate's loader reads RUN/best in a loop while training replaces it at every step.

best/ is replaced by renaming (the new version is written whole under a temporary name, the old one is
renamed aside, the new one renamed in); the reader opens every file through one handle on the directory
before reading any, so all come from one version, and starts again when a swap got in the way
(carbrand/filesystem.py: read_directory_consistently). Never a torn export: weights of one version with
another's config, a missing file, or best/ not found.
"""

import json
import sys

import pytest

from tests.helpers.fault_runs import start, start_training
from tests.helpers.paths import REPO

STEPS = 8


@pytest.mark.slow
def test_loader_never_reads_a_torn_export_while_training_replaces_best_every_step(prepared_cars5, tmp_path):
    run_dir, stop, result = tmp_path / "run", tmp_path / "stop", tmp_path / "reads.json"
    reader = start([sys.executable, str(REPO / "tests/helpers/export_reader.py"), str(run_dir / "best"), str(stop),
                    str(result)], tmp_path / "reader")
    try:
        training = start_training(prepared_cars5, run_dir, "data.loader=torchvision", f"train.max_steps={STEPS}",
                                  "train.eval_every_steps=1", "train.log_every=4", logs=tmp_path / "train",
                                  wrapper=[sys.executable, str(REPO / "tests/helpers/export_every_step.py")])
        assert training.wait(timeout=300) == 0, training.stderr[-3000:]
    finally:
        stop.touch()
        assert reader.wait(timeout=120) == 0, reader.stderr[-3000:]

    written = dict(line.split() for line in (run_dir / "exports.log").read_text().splitlines())
    assert len(written) == STEPS
    reads = json.loads(result.read_text())
    loads, errors = reads["loads"], reads["errors"]
    assert errors == [], errors[:5]
    torn = [(marker, digest) for marker, digest in loads if written.get(marker) != digest]
    assert torn == [], f"{len(torn)} of {len(loads)} loads mixed two versions: {torn[:3]}"
    versions = {marker for marker, _ in loads}
    assert len(loads) >= 2 * STEPS and len(versions) >= STEPS // 2, (len(loads), sorted(versions))
