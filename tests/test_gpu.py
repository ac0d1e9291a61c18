"""GPU-only checks (`pytest -m gpu` on a CUDA host; deselected elsewhere): the trainer and
evaluator end to end with DALI's GPU decoder, bf16 and fp16 (grad scaler), channels-last;
fp16 steps the grad scaler skips, with the fused CUDA optimizer; a timm backbone with the precision auto picks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from carbrand.checkpoint import load_training_checkpoint
from carbrand.training.optimization import Schedule
from tests.helpers.subprocesses import assert_ok, subprocess_environment
from tests.helpers.training_runs import read_metrics, run_training

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU_RUN = ("data.loader=dali", "data.decode=gpu", "train.channels_last=true", "train.max_steps=12",
           "train.log_every=4", "train.eval_every_steps=12", "data.batch_size=32")


def assert_evaluates_every_test_photo_on_the_gpu(best: Path, prepared: Path, out: Path) -> dict:
    """`carbrand evaluate` with DALI's GPU decoder scores all 100 cars5 test photos; its metrics.json."""
    evaluated = subprocess.run([sys.executable, "-m", "carbrand.evaluate", "--checkpoint", str(best), "--data",
                                str(prepared), "--decode", "gpu", "--loader", "dali", "--out", str(out)],
                               capture_output=True, text=True, env=subprocess_environment(), timeout=600, check=False)
    assert_ok(evaluated)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 100
    return metrics


def test_gpu_training_with_gpu_augmentation_and_mixing(prepared_cars5, tmp_path):
    """TrivialAugment in the DALI graph on the GPU (after the mixed decoder), mixup/CutMix on the device batch."""
    run_dir = tmp_path / "run"
    done = run_training(prepared_cars5, run_dir, *GPU_RUN, "train.precision=bf16", "data.augment=trivial",
                        "train.mixup_alpha=0.2", "train.cutmix_alpha=1.0")
    assert_ok(done)
    assert "loader dali (decode gpu)" in done.stdout and "augment trivial; mixup 0.2 + CutMix 1" in done.stdout
    losses = [r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_training_with_dali_gpu_decode_then_evaluate(prepared_cars5, tmp_path, precision):
    run_dir = tmp_path / "run"
    done = run_training(prepared_cars5, run_dir, *GPU_RUN, f"train.precision={precision}")
    assert_ok(done)
    assert "loader dali (decode gpu)" in done.stdout
    records = read_metrics(run_dir)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert all(r["train/gpu_memory_gb"] > 0 for r in records if "train/loss" in r)
    assert_evaluates_every_test_photo_on_the_gpu(run_dir / "best", prepared_cars5, tmp_path / "evaluation")


def test_timm_efficientnet_trains_in_the_precision_auto_picks_then_evaluates_at_a_higher_resolution(prepared_cars5,
                                                                                                   tmp_path):
    """The fine-tuning recipe's backbone (timm, depthwise convolutions, SiLU) under AMP, channels-last and EMA on the
    GPU, with precision auto: bf16 on a GPU with native bf16 (compute capability 8.0 on), fp16 with a scaler below."""
    run_dir = tmp_path / "run"
    done = run_training(prepared_cars5, run_dir, *GPU_RUN, "train.precision=auto", "model.arch=tf_efficientnet_lite0",
                        "model.pretrained=none", "train.ema_decay=0.9", "data.image_size=160", "data.eval_image_size=192")
    assert_ok(done)
    expected = "bf16 (auto: GPU with bf16)" if torch.cuda.get_device_capability()[0] >= 8 else "fp16 (auto: GPU without bf16)"
    assert f"precision {expected}" in done.stdout, done.stdout[-2000:]
    losses = [r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    metrics = assert_evaluates_every_test_photo_on_the_gpu(run_dir / "best", prepared_cars5, tmp_path / "evaluation")
    assert metrics["image_size"] == 192, "the export's evaluation resolution, not the training one"


def test_memory_loader_run_is_faster_than_nothing_and_counts_images(prepared_cars5, tmp_path):
    """data.loader=memory on the GPU: the input-free ceiling the benchmark compares against."""
    run_dir = tmp_path / "run"
    done = run_training(prepared_cars5, run_dir, *GPU_RUN, "train.precision=bf16", "data.loader=memory")
    assert_ok(done)
    rates = [r["train/images_per_second"] for r in read_metrics(run_dir) if "train/images_per_second" in r]
    assert len(rates) == 3 and min(rates) > 0


def test_fp16_skipped_steps_are_counted_and_do_not_advance_the_schedule(prepared_cars5, tmp_path):
    """A first loss scale of 2**24 overflows the fp16 gradients for sure: the scaler skips steps, halving the scale
    each time, until it fits. The optimizer is fused on CUDA, so it is always called and Accelerate's
    `optimizer_step_was_skipped` stays False: the trainer must see the skips from the scale."""
    run_dir = tmp_path / "run"
    done = run_training(prepared_cars5, run_dir, "data.loader=torchvision", "train.precision=fp16",
                        "train.fp16_init_scale=16777216", "data.batch_size=32", "train.max_steps=24", "train.log_every=1")
    assert_ok(done)
    records = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert [r["step"] for r in records] == list(range(1, 25))
    skipped = records[-1]["train/skipped_steps"]
    assert 0 < skipped < 24, [r["train/skipped_steps"] for r in records]
    # train/lr is the rate for the next step: where the schedule stands after the steps applied so far
    # (cars5 at batch 32: 8 steps per epoch, so 8 warm-up steps, then cosine to step 24; peak 0.001, not scaled)
    schedule = Schedule(total_steps=24, warmup_steps=8, frozen_backbone_steps=0, min_lr_ratio=0.0)
    for record in records:
        applied = record["step"] - record["train/skipped_steps"]
        assert record["train/lr"] == pytest.approx(0.001 * schedule.factor(applied), rel=1e-9), record
    saved = load_training_checkpoint(run_dir / "checkpoints" / "step_24").training_state
    assert saved["progress"]["skipped_steps"] == skipped
    assert saved["scheduler"]["last_epoch"] == 24 - skipped, "the schedule advances on applied steps only"
