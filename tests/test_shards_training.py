"""Training and evaluating from shards in real processes: 2 ranks over gloo with each loader, the evaluation of
the shards on 2 processes scoring what the files score on 1, and a stopped run resumed to the straight run's losses.
Tiny runs (32 px, a few steps): the shard-level exactness is in tests/test_shards.py, these check the wiring."""

from __future__ import annotations

import csv
import json
import subprocess

import pytest

from carbrand.prepare.shard_command import shard_dataset
from tests.helpers.fault_runs import TINY, complete_checkpoints, fault_environment
from tests.helpers.paths import REPO
from tests.helpers.subprocesses import assert_ok
from tests.helpers.training_runs import (
    launch_command,
    probed_train_command,
    read_metrics,
    run_training,
    train_command,
)

EVALUATE = REPO / "carbrand" / "evaluate.py"
TWO_RANKS = (*TINY, "train.collective_timeout_s=60", "train.log_every=1")


@pytest.fixture(scope="module")
def sharded(prepared_cars5, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    shard_dataset(prepared_cars5, out, shard_size_mb=1.0, quiet=True)
    return out


@pytest.mark.slow
def test_two_ranks_train_from_shards_with_each_loader_and_the_shards_evaluate_as_the_files(sharded, prepared_cars5, tmp_path):
    torchvision_run, dali_run = tmp_path / "torchvision", tmp_path / "dali"
    # Both trainings at once, as tests/test_evaluate.py runs its two evaluations: each is mostly start-up.
    commands = [
        ("torchvision", torchvision_run, ("data.loader=torchvision", "train.max_steps=3")),
        ("dali", dali_run, ("data.loader=dali", "data.decode=cpu", "data.workers=1", "train.max_steps=2")),
    ]
    trainings = [subprocess.Popen([str(a) for a in train_command(sharded / "shards.json", run_dir, *TWO_RANKS, *overrides,
                                                                 num_processes=2)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fault_environment(), cwd=REPO)
                 for _, run_dir, overrides in commands]
    for training in trainings:
        stdout, stderr = training.communicate(timeout=600)
        assert training.returncode == 0, stderr[-3000:]
        assert "266 train / 30 val images" in stdout
    assert [r["step"] for r in read_metrics(dali_run) if "train/loss" in r] == [1, 2]

    # The torchvision run's model, evaluated from the shards on 2 processes and from the files on 1.
    common = ["--checkpoint", str(torchvision_run / "best"), "--split", "test", "--batch-size", "9"]
    runs = [subprocess.Popen([str(a) for a in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=fault_environment(), cwd=tmp_path)
            for command in (launch_command(2, EVALUATE) + [*common, "--data", str(sharded), "--out", str(tmp_path / "shards")],
                            launch_command(1, EVALUATE) + [*common, "--data", str(prepared_cars5), "--out", str(tmp_path / "files")])]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-3000:]
    shards, files = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("shards", "files"))
    assert shards["world_size"] == 2 and shards["samples"] == files["samples"] == 100
    for key, value in files.items():
        if key in ("world_size", "seconds", "batch_size", "data"):
            continue
        if isinstance(value, float):
            assert shards[key] == pytest.approx(value, abs=1e-6), key
        elif not key.startswith("calibration"):  # reliability bins: floats up to summation order
            assert shards[key] == value, key
    predicted = {name: {r["path"]: r["predicted_brand"] for r in csv.DictReader((tmp_path / name / "predictions.csv").open())}
                 for name in ("shards", "files")}
    assert predicted["shards"] == predicted["files"] and len(predicted["files"]) == 100  # photo by photo


@pytest.mark.slow
def test_a_run_from_shards_stopped_mid_epoch_resumes_to_the_straight_runs_losses(sharded, tmp_path):
    run = ("data.loader=torchvision", "train.max_steps=6", "train.seed=3", *TWO_RANKS)
    straight = tmp_path / "straight"
    assert_ok(run_training(sharded, straight, *run, env=fault_environment()))

    stopped = tmp_path / "stopped"
    for out, extra in (("first", "--signal-at-step=SIGUSR1:3"), ("second", "--record-start")):
        result = subprocess.run(probed_train_command(sharded, stopped, tmp_path / out, *run, extra, num_processes=1),
                                capture_output=True, text=True, timeout=600, env=fault_environment(), cwd=REPO)
        if out == "first":
            assert result.returncode == 143, result.stderr[-3000:]
            assert complete_checkpoints(stopped) == [3]
        else:
            assert_ok(result)
            assert f"resumed from {stopped / 'checkpoints' / 'step_3'} at step 3" in result.stdout
    records = read_metrics(stopped)
    restart = next(i for i, r in enumerate(records) if r.get("run/restarts") == 1)
    resumed = {r["step"]: r["train/loss"] for r in records[restart:] if "train/loss" in r}
    uninterrupted = {r["step"]: r["train/loss"] for r in read_metrics(straight) if "train/loss" in r}
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:  # same seed, same order, same crops: the same float32 arithmetic in the same order
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6), (step, resumed[step], uninterrupted[step])
