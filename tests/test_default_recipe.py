"""`accelerate launch carbrand/train.py` without --config trains configs/default.yaml on the data `carbrand demo` writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from carbrand.config import Config, load_config, safe_yaml_load
from carbrand.demo.command import DEFAULT_OUT, PREPARED_FOLDER
from carbrand.precision import choose_precision, resolve_precision
from carbrand.train import DEFAULT_RECIPE
from tests.helpers.paths import REPO
from tests.helpers.subprocesses import assert_ok, subprocess_environment

TRAIN_SCRIPT = REPO / "carbrand" / "train.py"
DEMO_MANIFEST = (DEFAULT_OUT / PREPARED_FOLDER).as_posix()
# The default recipe is a ResNet-50 at 224 px; the test keeps its data path and precision and trains a tiny model one step.
TINY = ("model.arch=resnet18", "data.image_size=32", "data.batch_size=8", "data.workers=1", "train.max_steps=1",
        "output.dir=run", "wandb.mode=disabled")


def accelerate_launch(cwd: Path, *arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN_SCRIPT), *arguments]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=subprocess_environment())


def test_default_recipe_reads_where_the_demo_writes():
    assert DEFAULT_RECIPE == REPO / "configs" / "default.yaml"
    assert load_config(DEFAULT_RECIPE).data.manifest == DEMO_MANIFEST
    assert Config().data.manifest == DEMO_MANIFEST  # the dataclass default and the documented one agree


def test_the_bare_command_trains_on_the_demo_data(tmp_path):
    from carbrand.demo.synthetic import make_demo_dataset
    from carbrand.prepare.command import prepare_dataset

    images = make_demo_dataset(tmp_path / DEFAULT_OUT / "images", images_per_class=6, test_images_per_class=2, image_size=48)
    prepare_dataset(images, tmp_path / DEMO_MANIFEST, quiet=True, workers=1)  # what `carbrand demo` does, smaller
    result = accelerate_launch(tmp_path, *TINY)
    assert_ok(result)
    saved = safe_yaml_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["manifest"] == DEMO_MANIFEST and saved["optim"]["name"] == "sgd"  # default.yaml's optimizer
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
    # default.yaml's precision is auto; the start line says what it became here, and every config the run wrote holds that
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert f"; precision {choose_precision('auto', device)};" in result.stdout, result.stdout[-3000:]
    written = sorted((tmp_path / "run").rglob("config.yaml"))  # the run's, each checkpoint's, best/'s
    assert {"run/config.yaml", "run/best/config.yaml"} <= {p.relative_to(tmp_path).as_posix() for p in written}
    assert len(written) >= 3, written  # and the checkpoint's
    for path in written:
        assert safe_yaml_load(path.read_text())["train"]["precision"] == resolve_precision("auto", device) != "auto", path


def test_the_bare_command_without_the_demo_data_says_how_to_make_it(tmp_path):
    result = accelerate_launch(tmp_path)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("carbrand train: error:")]
    assert len(ours) == 1, result.stderr[-3000:]
    assert f"no dataset at {DEMO_MANIFEST}" in ours[0] and "`carbrand demo`" in ours[0] and "carbrand prepare" in ours[0]
    assert "usage:" not in result.stderr
