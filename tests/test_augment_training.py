"""Training with `data.augment` and mixup/CutMix on: both loaders, 2 DDP processes on CPU, with gradient accumulation."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from carbrand.config import load_config
from carbrand.errors import ConfigError
from tests.helpers.fault_runs import TINY, fault_environment
from tests.helpers.paths import REPO
from tests.helpers.subprocesses import assert_ok
from tests.helpers.training_runs import probed_train_command, read_metrics, run_training

MIXING = ("train.mixup_alpha=0.2", "train.cutmix_alpha=1.0", "train.mix_switch_prob=0.5")


@pytest.mark.slow
@pytest.mark.parametrize("loader, augment", [("torchvision", "trivial"), ("torchvision", "randaugment"),
                                             ("dali", "trivial"), ("dali", "randaugment")])
def test_two_ranks_train_with_augmentation_and_mixing(prepared_cars5, tmp_path, loader, augment):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    run_dir = tmp_path / "run"
    result = run_training(prepared_cars5, run_dir, *TINY, f"data.loader={loader}", "data.decode=cpu",
                          f"data.augment={augment}", "data.randaugment_ops=2", "data.randaugment_magnitude=12", *MIXING,
                          "train.grad_accum_steps=2", "train.max_steps=3", "train.log_every=1",
                          "train.collective_timeout_s=60", num_processes=2, env=fault_environment())
    assert_ok(result)
    assert f"loader {loader} (decode cpu)" in result.stdout
    assert f"augment {augment}; mixup 0.2 + CutMix 1 (CutMix on 50% of batches)" in result.stdout, result.stdout
    losses = {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) and v > 0 for v in losses.values()), losses
    saved = load_config(run_dir / "config.yaml")
    assert (saved.data.augment, saved.train.mixup_alpha, saved.train.cutmix_alpha) == (augment, 0.2, 1.0)


def test_unknown_policy_is_one_line_naming_data_augment_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "carbrand.cli", "train", "--config", str(REPO / "configs/cars5_cpu.yaml"),
                             "data.augment=randomaugment"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.augment" in lines[0] and "trivial" in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, key", [
    ("train.mixup_alpha=-0.2", "train.mixup_alpha"), ("train.cutmix_alpha=-1", "train.cutmix_alpha"),
    ("train.mix_switch_prob=1.5", "train.mix_switch_prob"), ("data.randaugment_magnitude=31", "data.randaugment_magnitude"),
    ("data.randaugment_ops=0", "data.randaugment_ops"),
])
def test_impossible_augmentation_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.slow
def test_resumed_two_rank_run_draws_what_the_uninterrupted_run_drew(prepared_cars5, tmp_path):
    """Each rank's crops, policy ops and mixup/CutMix draws come from (seed, rank, epoch, position), nothing stateful:
    a run resumed from step 4's checkpoint must log the uninterrupted run's losses from step 5 on. One thread per
    process and the torchvision loader (whose draws are per sample): the same arithmetic, so rel 1e-6."""
    common = (*TINY, "data.loader=torchvision", "data.augment=trivial", *MIXING, "train.epochs=1", "train.log_every=1",
              "train.seed=4", "train.collective_timeout_s=60")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_ok(run_training(prepared_cars5, straight, *common, "train.checkpoint_every_steps=4", num_processes=2,
                           env=fault_environment()))
    result = run_training(prepared_cars5, resumed, *common, f"train.resume={straight / 'checkpoints' / 'step_4'}",
                          num_processes=2, env=fault_environment())
    assert_ok(result)
    assert "at step 4" in result.stdout and "mixup 0.2 + CutMix 1" in result.stdout, result.stdout
    expected = {r["step"]: r["train/loss"] for r in read_metrics(straight) if "train/loss" in r}
    got = {r["step"]: r["train/loss"] for r in read_metrics(resumed) if "train/loss" in r}
    assert sorted(got) == list(range(5, max(expected) + 1)) and max(expected) == 8, (sorted(got), sorted(expected))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-6), (step, got[step], expected[step])


@pytest.mark.slow
def test_each_rank_trains_on_mixes_of_its_own_in_a_two_rank_run(prepared_cars5, tmp_path):
    """Each DDP rank must mix its batches by its own draws (seed, its rank, epoch, micro-batch): two ranks passing
    the same rank would blend the same partner positions with the same weights on both shards. Recorded per rank
    by tests/helpers/rank_state_probe.py --record-mixes, accumulation windows included."""
    out = tmp_path / "probe"
    command = probed_train_command(prepared_cars5, tmp_path / "run", out, "--record-mixes", *TINY,
                                   "data.loader=torchvision", *MIXING, "train.grad_accum_steps=2", "train.max_steps=3",
                                   "train.collective_timeout_s=60", num_processes=2)
    assert_ok(subprocess.run(command, capture_output=True, text=True, timeout=600, env=fault_environment(), cwd=REPO))
    draws = {}
    for rank in (0, 1):
        records = [json.loads(line) for line in (out / f"mixes_rank{rank}.jsonl").read_text().splitlines()]
        assert all(r["train_step_got_the_draw"] for r in records if "train_step_got_the_draw" in r)
        draws[rank] = [r for r in records if "kind" in r]
        assert len(draws[rank]) == 6, "3 optimizer steps x 2 micro-batches"
        assert {r["rank"] for r in draws[rank]} == {rank}, "the draw is made with the process's own rank"
        assert [(r["epoch"], r["batch"]) for r in draws[rank]] == [(0, b) for b in range(6)]
    assert {r["kind"] for r in draws[0] + draws[1]} <= {"mixup", "cutmix"}
    for mine, theirs in zip(draws[0], draws[1]):
        assert (mine["kind"], mine["weight"], mine["box"], mine["permutation"]) != (
            theirs["kind"], theirs["weight"], theirs["box"], theirs["permutation"]), (mine, theirs)
