"""Killed while writing a checkpoint: the half-written one is never resumed from; the previous one still loads."""

import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from carbrand.checkpoint import find_resume_checkpoint, load_export_model, load_training_checkpoint
from carbrand.inference.predict import Predictor
from carbrand.model import build_model, load_classifier_state
from tests.helpers.fault_runs import TINY, fault_environment, start_training
from tests.helpers.paths import HELPERS, REPO
from tests.helpers.subprocesses import assert_ok
from tests.helpers.training_runs import run_training

COMMON = ("data.loader=torchvision", "train.max_steps=8", "train.log_every=2", "train.checkpoint_every_steps=3")


@pytest.mark.slow
def test_kill_while_saving_a_step_checkpoint(prepared_cars5, tmp_path):
    run_dir = tmp_path / "run"
    wrapper = [sys.executable, str(HELPERS / "kill_during_save.py"), "6"]
    run = start_training(prepared_cars5, run_dir, *COMMON, logs=tmp_path / "logs", wrapper=wrapper)
    assert run.wait(timeout=300) == -9, run.stderr[-3000:]

    checkpoints = run_dir / "checkpoints"
    half_written = [p for p in checkpoints.iterdir() if p.name.startswith(".tmp-step_6-")]
    assert len(half_written) == 1 and not (checkpoints / "step_6").exists(), sorted(checkpoints.iterdir())
    assert [p.name for p in half_written[0].iterdir()] == ["model.safetensors"], "the kill must come mid-save"
    previous = checkpoints / "step_3"
    assert find_resume_checkpoint(run_dir, "auto") == previous
    assert (run_dir / "last").resolve() == previous.resolve()
    loaded = load_training_checkpoint(previous)
    load_classifier_state(build_model("resnet18", 5), loaded.model_state, str(previous))
    assert loaded.training_state["progress"]["step"] == 3

    result = run_training(prepared_cars5, run_dir, *TINY, *COMMON, env=fault_environment())  # train.resume: auto
    assert_ok(result)
    assert f"resumed from {previous} at step 3" in result.stdout
    assert (checkpoints / "step_6").is_dir() and (checkpoints / "step_8").is_dir()
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")], "the crash's leftovers are cleaned up"


# Replacing best/ goes through the same temporary-then-rename path: kill it half-way and read the old one.
REPLACE_BEST_AND_DIE = textwrap.dedent("""
    import os, signal, sys
    import torch
    import carbrand.checkpoint as checkpoint
    from carbrand.config import load_config
    from carbrand.model import build_model

    best, classes = sys.argv[1], ["audi", "bmw", "ferrari", "lamborghini", "mercedes"]
    config = load_config(None, ["model.arch=resnet18"])
    torch.manual_seed(0)
    checkpoint.save_export(checkpoint.Path(best), checkpoint.plain_state_dict(build_model("resnet18", 5)), classes, config)
    write = checkpoint.save_file

    def write_half_then_die(tensors, filename, metadata=None):
        write(tensors, filename, metadata=metadata)
        os.truncate(filename, os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save_file = write_half_then_die
    torch.manual_seed(1)
    checkpoint.save_export(checkpoint.Path(best), checkpoint.plain_state_dict(build_model("resnet18", 5)), classes, config)
""")


def test_kill_while_replacing_best_keeps_the_old_export(tmp_path):
    best = tmp_path / "run" / "best"
    result = subprocess.run([sys.executable, "-c", REPLACE_BEST_AND_DIE, str(best)], capture_output=True, text=True,
                            timeout=300, env=fault_environment(), cwd=REPO)
    assert result.returncode == -9, result.stderr[-3000:]
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".tmp-best-")], "the kill must come mid-save"
    model, export = load_export_model(best)
    torch.manual_seed(0)
    first = build_model("resnet18", 5).state_dict()
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items()), "best/ must still be the first export"


@pytest.mark.slow
def test_kill_between_the_two_renames_of_best_leaves_a_loadable_best(prepared_cars5, cars5_dir, tmp_path, capfd):
    """best/ renamed aside to .old-best-PID, the new one not yet renamed in: readers and the next run put it back."""
    run_dir = tmp_path / "run"
    every_two = ("data.loader=torchvision", "train.max_steps=6", "train.log_every=2", "train.eval_every_steps=2",
                 "train.checkpoint_every_steps=2", "train.best_metric=last")
    wrapper = [sys.executable, str(HELPERS / "kill_during_swap.py"), "best"]
    run = start_training(prepared_cars5, run_dir, *every_two, logs=tmp_path / "logs", wrapper=wrapper)
    assert run.wait(timeout=300) == -9, run.stderr[-3000:]
    left = sorted(p.name for p in run_dir.iterdir() if p.name.startswith((".old-best-", ".tmp-best-")))
    assert not (run_dir / "best").exists() and [name[:9] for name in left] == [".old-best", ".tmp-best"], left
    untouched = tmp_path / "untouched"
    shutil.copytree(run_dir, untouched, symlinks=True)  # for the next training, before any reader restores best/

    model, export = load_export_model(run_dir / "best")  # a reader: evaluate, calibrate and serve load the same way
    assert export.classes == ["audi", "bmw", "ferrari", "lamborghini", "mercedes"]
    assert f"restored it from {left[0]}" in capfd.readouterr().err
    photo = sorted((cars5_dir / "test" / "bmw").iterdir())[0]
    assert Predictor.from_checkpoint(run_dir / "best", device="cpu").predict([photo], topk=1)[0].topk[0].brand in export.classes

    result = run_training(prepared_cars5, untouched, *TINY, *every_two, env=fault_environment())  # train.resume: auto
    assert_ok(result)
    assert "restored it from .old-best-" in result.stderr, result.stderr[-3000:]
    load_export_model(untouched / "best")
    assert not [p.name for p in untouched.iterdir() if p.name.startswith((".old-", ".tmp-"))], "leftovers removed"
