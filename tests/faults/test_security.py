"""Hostile files: pickle payloads are refused and never run, YAML tags build nothing, manifest paths stay in the root
(where they really lead: symlinks are followed).

The W&B API key never reaching logs, saved configs or metrics.jsonl is checked where a key is in
use: tests/faults/test_wandb_unreachable.py (online) and
tests/test_train.py::test_wandb_offline_run_holds_the_logged_values (offline).
In-process checks of the loaders themselves: tests/test_model.py::test_pickle_payload_is_refused_and_never_executed,
tests/test_config.py::test_yaml_is_loaded_safely.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from carbrand import cli
from carbrand.checkpoint import plain_state_dict, save_export
from carbrand.config import load_config
from carbrand.model import build_model
from tests.helpers.fault_runs import error_line, start_training, tree
from tests.helpers.training_runs import CPU_RECIPE

CARS5 = ["audi", "bmw", "ferrari", "lamborghini", "mercedes"]


class Payload:
    """Unpickling this runs a shell command that creates `marker`: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def run_cli(*arguments, capsys) -> tuple[int, str]:
    try:
        code = cli.main([str(a) for a in arguments])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return code, captured.err.strip()


@pytest.fixture
def export(tmp_path) -> Path:
    config = load_config(None, ["model.arch=resnet18", "data.image_size=32", "wandb.mode=disabled"])
    return save_export(tmp_path / "best", plain_state_dict(build_model("resnet18", 5)), CARS5, config)


@pytest.fixture
def photo(cars5_dir) -> Path:
    return sorted((cars5_dir / "test" / "bmw").iterdir())[0]


@pytest.mark.slow
def test_payload_in_a_training_checkpoint_is_refused_by_resume_auto(prepared_cars5, tmp_path):
    """A real `carbrand train` process finds a planted checkpoint in its run directory and refuses it."""
    run_dir, marker = tmp_path / "run", tmp_path / "payload-ran"
    planted = run_dir / "checkpoints" / "step_3"
    planted.mkdir(parents=True)
    save_file(plain_state_dict(build_model("resnet18", 5)), str(planted / "model.safetensors"))
    torch.save({"progress": Payload(marker), "optimizer": {}, "scheduler": {}}, planted / "training_state.pt")
    before = tree(run_dir)
    run = start_training(prepared_cars5, run_dir, "data.loader=torchvision", "train.max_steps=2", logs=tmp_path / "logs")
    assert run.wait(timeout=300) == 1, run.stderr[-3000:]
    line = error_line(run.stderr)
    assert line == (f"carbrand train: error: {planted} cannot be loaded safely (refused by the weights-only loader: "
                    f"Trying to load unsupported GLOBAL posix.system whose module posix is blocked.)"), line
    assert run.stderr.strip() == line and not marker.exists()
    assert tree(run_dir) == before, "refused before anything was written"


@pytest.mark.parametrize("where", ["export weights (predict)", "export weights (evaluate)", "pretrained weights (train)"])
def test_payload_in_weights_is_refused_and_never_executed(where, export, photo, prepared_cars5, tmp_path, capsys,
                                                          fresh_accelerate_state):
    marker = tmp_path / "payload-ran"
    if where.startswith("export"):
        (export / "model.safetensors").write_bytes(pickle.dumps({"fc.weight": Payload(marker)}))
        arguments = (["predict", "--checkpoint", export, photo] if "predict" in where else
                     ["evaluate", "--checkpoint", export, "--data", prepared_cars5, "--out", tmp_path / "eval"])
        expected = f"{export / 'model.safetensors'} is not a valid safetensors file"
        expected_code = 1
    else:
        weights = tmp_path / "weights.pt"
        torch.save({"conv1.weight": Payload(marker)}, weights)
        arguments = ["train", "--config", CPU_RECIPE, f"data.manifest={prepared_cars5}", f"output.dir={tmp_path / 'run'}",
                     "data.loader=torchvision", f"model.pretrained={weights}"]
        expected = (f"config key 'model.pretrained': {weights} is not a readable weights file "
                    f"(refused by the weights-only loader: Trying to load unsupported GLOBAL")
        expected_code = 2  # a bad file named by a config key is a usage error, like every other bad key
    code, err = run_cli(*arguments, capsys=capsys)
    assert code == expected_code and len(err.splitlines()) == 1 and expected in err, err
    assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "eval").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["recipe (train)", "export config (predict)"])
def test_yaml_python_tags_build_nothing(where, export, photo, tmp_path, capsys):
    marker = tmp_path / "yaml-ran"
    tag = f"!!python/object/apply:os.system ['touch {marker}']"
    if where.startswith("recipe"):
        recipe = tmp_path / "evil.yaml"
        recipe.write_text(f"data:\n  manifest: {tag}\n")
        code, err = run_cli("train", "--config", recipe, capsys=capsys)
        assert code == 2 and f"config file {recipe} is not valid YAML" in err, err
    else:
        (export / "config.yaml").write_text(f"model: {tag}\n")
        code, err = run_cli("predict", "--checkpoint", export, photo, capsys=capsys)
        assert code == 1 and f"{export / 'config.yaml'} is not a valid carbrand config" in err, err
    assert len(err.splitlines()) == 1 and not marker.exists()


def reading_command(command: str, prepared: Path, export, out: Path) -> list:
    """`carbrand train` or `carbrand evaluate` reading the prepared dataset `prepared`, writing to `out`."""
    if command == "train":
        return ["train", "--config", CPU_RECIPE, f"data.manifest={prepared}", f"output.dir={out}", "data.loader=torchvision"]
    return ["evaluate", "--checkpoint", export, "--data", prepared, "--out", out]


@pytest.mark.parametrize("command", ["train", "evaluate"])
@pytest.mark.parametrize("path, refusal", [("../outside.jpg", "escapes the dataset root"),
                                           ("/etc/hostname", "absolute image path")], ids=["dot-dot", "absolute"])
def test_manifest_paths_cannot_leave_the_dataset_root(command, path, refusal, prepared_cars5, export, tmp_path, capsys,
                                                      fresh_accelerate_state):
    prepared = tmp_path / "prepared"
    shutil.copytree(prepared_cars5, prepared)
    split = "train" if command == "train" else "test"
    rows = (prepared / f"{split}.csv").read_text().splitlines()
    (prepared / f"{split}.csv").write_text("\n".join([rows[0], f"{path},0,audi", *rows[1:]]) + "\n")
    code, err = run_cli(*reading_command(command, prepared, export, tmp_path / "out"), capsys=capsys)
    assert code == 1 and len(err.splitlines()) == 1, err
    assert f"{prepared / f'{split}.csv'}:2: " in err and refusal in err and repr(path) in err, err
    assert not (tmp_path / "out").exists()


def plant_escape(kind: str, prepared: Path, root: Path, photo: Path) -> tuple[str, Path]:
    """An escape of `kind` out of `root`; returns the CSV path to add (or '' for the manifest's root) and where it leads."""
    outside = root.parent / "outside"
    outside.mkdir()
    shutil.copy(photo, outside / "secret.jpg")
    (root / "audi").mkdir(parents=True)
    if kind == "file symlink":
        (root / "audi" / "link.jpg").symlink_to(outside / "secret.jpg")
        return "audi/link.jpg", outside / "secret.jpg"
    if kind == "folder symlink":
        (root / "bmw").symlink_to(outside, target_is_directory=True)
        return "bmw/secret.jpg", outside / "secret.jpg"
    manifest = json.loads((prepared / "manifest.json").read_text())  # kind == "relative root": root climbs out
    (prepared / "manifest.json").write_text(json.dumps(manifest | {"root": "../outside"}))
    return "", outside


@pytest.mark.parametrize("command", ["train", "evaluate"])
@pytest.mark.parametrize("kind", ["file symlink", "folder symlink", "relative root"])
def test_manifest_symlinks_and_roots_cannot_leave_the_dataset_root(command, kind, prepared_cars5, export, photo,
                                                                   tmp_path, capsys, fresh_accelerate_state):
    """Where a path really leads counts, not how it is written: symlinks are followed before the check."""
    prepared, root = tmp_path / "prepared", tmp_path / "root"
    shutil.copytree(prepared_cars5, prepared)
    manifest = json.loads((prepared / "manifest.json").read_text())
    (prepared / "manifest.json").write_text(json.dumps(manifest | {"root": str(root)}))
    path, leads_to = plant_escape(kind, prepared, root, photo)
    split = "train" if command == "train" else "test"
    if path:
        rows = (prepared / f"{split}.csv").read_text().splitlines()
        (prepared / f"{split}.csv").write_text("\n".join([rows[0], f"{path},0,audi", *rows[1:]]) + "\n")
    code, err = run_cli(*reading_command(command, prepared, export, tmp_path / "out"), capsys=capsys)
    assert code == 1 and len(err.splitlines()) == 1, err
    named = f"{prepared / f'{split}.csv'}:2: image path {path!r}" if path else f"{prepared / 'manifest.json'}: relative root"
    assert named in err and f"leads to {leads_to}" in err and "outside the dataset" in err, err
    assert not (tmp_path / "out").exists()


def test_a_symlink_that_stays_inside_the_root_is_fine(prepared_cars5, photo, tmp_path):
    """A link from one brand folder to a photo in another (deduplicated storage): inside the root, so accepted."""
    from carbrand.data.manifest import load_prepared

    prepared, root = tmp_path / "prepared", tmp_path / "root"
    shutil.copytree(prepared_cars5, prepared)
    (root / "audi").mkdir(parents=True)
    shutil.copy(photo, root / "audi" / "a.jpg")
    (root / "bmw").symlink_to(root / "audi", target_is_directory=True)
    (root / "audi" / "b.jpg").symlink_to("a.jpg")
    manifest = json.loads((prepared / "manifest.json").read_text())
    (prepared / "manifest.json").write_text(json.dumps(manifest | {"root": str(root)}))
    (prepared / "test.csv").write_text("path,label,brand\naudi/b.jpg,0,audi\nbmw/a.jpg,1,bmw\n")
    samples = load_prepared(prepared).split("test")
    assert [s.path for s in samples] == [root / "audi" / "b.jpg", root / "bmw" / "a.jpg"]  # as written, not resolved
