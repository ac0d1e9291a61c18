"""The README's main command: `carbrand demo` runs generate → prepare → train → evaluate → predict."""

import json
import subprocess

import pytest

from tests.helpers.paths import REPO
from tests.helpers.subprocesses import assert_ok, subprocess_environment


@pytest.mark.slow
def test_demo_runs_the_whole_story_and_learns(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(["carbrand", "demo", "--out", str(out), "--epochs", "4"], capture_output=True, text=True,
                            timeout=600, env=subprocess_environment(), cwd=REPO)
    assert_ok(result)
    for name in ("model.safetensors", "classes.json", "config.yaml"):
        assert (out / "run" / "best" / name).is_file()
    metrics = json.loads((out / "run" / "eval_test" / "metrics.json").read_text())
    assert metrics["samples"] == 80  # 5 brands x 16 test images, each counted once
    assert metrics["accuracy"] > 0.6, metrics["accuracy"]  # chance is 0.2: the stand-in brands are learnable
    assert "(really aurora): aurora" in result.stdout  # the predicted photo is an aurora, ranked first
    assert "Done. Results:" in result.stdout
