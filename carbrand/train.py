"""Train a car-brand classifier (ResNet-50 by default) with Accelerate DDP, AMP and channels-last.

    accelerate launch carbrand/train.py --config configs/stanford_cars.yaml
    accelerate launch --multi_gpu --num_processes 8 carbrand/train.py --config configs/stanford_cars.yaml optim.lr=0.2
    accelerate launch --multi_gpu --num_processes 2 carbrand/train.py --config configs/cars5_cpu.yaml
    torchrun --nproc-per-node 8 carbrand/train.py --config configs/stanford_cars.yaml
    python -m carbrand.train --config configs/demo.yaml      (same as `carbrand train --config ...`)

Reads top to bottom: config -> accelerator -> tracker -> data -> model -> optimizer ->
schedule -> prepare -> resume -> loop (step, log every N, validate, checkpoint) -> export.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # run as a file by `accelerate launch` / `torchrun`
    _here = Path(__file__).resolve().parent
    # The script's own folder would shadow top-level modules (config, data, metrics, ...): use the repo root.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, TorchDynamoPlugin, set_seed
from tqdm import tqdm

from carbrand.checkpoint import (
    find_resume_checkpoint,
    load_training_checkpoint,
    plain_state_dict,
    save_export,
    save_training_checkpoint,
    step_checkpoints,
)
from carbrand.config import Config, load_config, save_config
from carbrand.data.loaders import build_eval_loader, build_train_loader, resolve_backend
from carbrand.data.manifest import load_prepared
from carbrand.errors import CarbrandError, ConfigError
from carbrand.heartbeat import Heartbeat
from carbrand.metrics import confusion_matrix, summarize
from carbrand.model import build_model, load_classifier_state
from carbrand.optimization import Schedule, build_optimizer, build_scheduler, peak_learning_rate
from carbrand.preemption import EXIT_CODE_PREEMPTED, StopRequest
from carbrand.tracking import Tracker

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint so a restart continues exactly here."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_metric: float = -1.0
    best_step: int = -1
    restarts: int = 0
    skipped_steps: int = 0  # fp16: steps the grad scaler skipped for inf/NaN gradients (logged, not fatal)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/cars5_cpu.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=0.05")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    return train(config)


def make_accelerator(config: Config) -> Accelerator:
    t = config.train
    if t.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.precision' is fp16, which needs a CUDA GPU; use bf16 or no on a CPU")
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = t.cudnn_benchmark  # fixed input shapes: autotune once
        torch.backends.cuda.matmul.allow_tf32 = t.tf32
        torch.backends.cudnn.allow_tf32 = t.tf32
    return Accelerator(
        # without cpu=True, processes launched on a GPU-less host do not join one gloo group
        cpu=not torch.cuda.is_available(),
        mixed_precision=t.precision,
        gradient_accumulation_steps=t.grad_accum_steps,
        # bucket views: gradients live inside DDP's all-reduce buckets, saving one copy per step
        kwargs_handlers=[
            DistributedDataParallelKwargs(gradient_as_bucket_view=True, broadcast_buffers=False),
            # a dead or stuck rank makes the others fail after this long instead of hanging forever
            InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=t.collective_timeout_s)),
        ],
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if config.model.compile else None,
        step_scheduler_with_optimizer=False,
    )


def check_run_dir_writable(run_dir: Path) -> None:
    """Fail now, not after hours of training, if checkpoints cannot be written (create, fsync, remove a file)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        with probe.open("w") as handle:
            handle.write("ok")
            handle.flush()
            os.fsync(handle.fileno())  # some filesystems (quota, NFS) only refuse at flush time
        probe.unlink()
    except OSError as error:
        raise CarbrandError(f"run directory {run_dir} is not writable ({error.strerror or error}); "
                            f"set output.dir to a writable directory") from None


def train(config: Config) -> int:
    accelerator = make_accelerator(config)
    heartbeat = Heartbeat(accelerator.process_index, accelerator.num_processes)
    # Installed for the whole run: the SIGTERM a launcher sends survivors when a peer dies is then
    # only recorded, and this rank still gets to say which peer was lost.
    stop_request = StopRequest()
    try:
        return train_with(config, accelerator, stop_request)
    except RuntimeError as error:
        # A collective failed (a peer's connection reset) or timed out: name the lost rank in one line.
        lost = heartbeat.describe_lost_peers() if accelerator.num_processes > 1 else None
        if lost is None:
            raise  # every peer is alive: a genuine bug, keep its traceback
        # gloo/NCCL messages start with a source location and end in advice: keep the first sentence
        reason = re.sub(r"^\[[^\]]*\]\s*", "", (str(error).strip().splitlines() or [type(error).__name__])[0])
        reason = reason.split(". ")[0][:160]
        raise CarbrandError(f"rank {accelerator.process_index} stops: {lost}; a collective failed ({reason}); "
                            f"restart the job to resume from the newest checkpoint") from None
    finally:
        stop_request.restore()
        heartbeat.stop()


def train_with(config: Config, accelerator: Accelerator, stop_request: StopRequest) -> int:
    run_dir = Path(config.output.dir)
    t, world_size, rank = config.train, accelerator.num_processes, accelerator.process_index

    # Data: every rank reads the same manifest; loaders shard by global rank.
    dataset = load_prepared(config.data.manifest)
    classes, train_samples, val_samples = dataset.classes, dataset.split("train"), dataset.splits.get("val", [])
    if not train_samples:
        raise CarbrandError(f"{dataset.directory}: the train split is empty")
    loader_name, decode = resolve_backend(config.data, accelerator.device)
    # resolved once (one notice, one answer); the saved config keeps what the user wrote, e.g. auto
    data = dataclasses.replace(config.data, loader=loader_name, decode=decode)
    loader_options = dict(rank=rank, world_size=world_size, device=accelerator.device,
                          dtype=DTYPES[t.precision], channels_last=t.channels_last)
    train_loader = build_train_loader(data, train_samples, seed=t.seed, **loader_options)
    val_loader = build_eval_loader(data, val_samples, **loader_options) if val_samples else None
    if val_loader is None:
        accelerator.print("carbrand: warning: no validation split; best/ will hold the last model")

    # Model and optimizer. Seeds: base + global rank, so no two ranks draw the same stream.
    set_seed(t.seed + rank)
    model = build_model(config.model.arch, len(classes), config.model.pretrained)
    if config.model.sync_batchnorm and world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    global_batch_size = config.data.batch_size * world_size * t.grad_accum_steps
    steps_per_epoch = train_loader.batches_per_epoch // t.grad_accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(f"config key 'train.grad_accum_steps' ({t.grad_accum_steps}) exceeds the "
                          f"{train_loader.batches_per_epoch} batches per epoch")
    total_steps = t.epochs * steps_per_epoch if t.max_steps == 0 else min(t.max_steps, t.epochs * steps_per_epoch)
    schedule = Schedule(total_steps=total_steps, warmup_steps=round(config.optim.warmup_epochs * steps_per_epoch),
                        frozen_backbone_steps=config.model.freeze_backbone_epochs * steps_per_epoch,
                        min_lr_ratio=config.optim.min_lr_ratio)
    optimizer = build_optimizer(model, config.optim, peak_learning_rate(config.optim, global_batch_size), accelerator.device)
    scheduler = build_scheduler(optimizer, schedule)

    # Resume before prepare: DDP then broadcasts the loaded weights to every rank (Accelerate moves optimizer state).
    progress, resumed_from, checkpoint = Progress(), find_resume_checkpoint(run_dir, t.resume), None
    if resumed_from is not None:
        checkpoint = load_training_checkpoint(resumed_from)
        progress = restore_training_state(checkpoint, model, optimizer, scheduler, accelerator)
        progress.restarts += 1
        if checkpoint.training_state.get("world_size") != world_size and progress.batch_in_epoch:
            # the position inside the epoch was counted in the old shards: redo this epoch's data from its start
            accelerator.print(f"carbrand: warning: resuming with {world_size} processes instead of "
                              f"{checkpoint.training_state.get('world_size')}; epoch {progress.epoch} restarts its data order")
            progress.batch_in_epoch = 0
    # Every input is read and valid: only now touch the disk, and fail here, not hours later, if it cannot be written.
    if accelerator.is_main_process:
        check_run_dir_writable(run_dir)
        save_config(config, run_dir / "config.yaml")
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped_model = accelerator.unwrap_model(model)
    ema_model = None
    if t.ema_decay > 0:
        ema_model = torch.optim.swa_utils.AveragedModel(
            unwrapped_model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(t.ema_decay), use_buffers=True)
        if checkpoint is not None and checkpoint.ema_state is not None:
            load_classifier_state(ema_model.module, checkpoint.ema_state, str(resumed_from))

    tracker = Tracker(run_dir, config, is_main=accelerator.is_main_process)
    accelerator.print(
        f"carbrand: {len(train_samples)} train / {len(val_samples)} val images, {len(classes)} brands; "
        f"{world_size} process(es) on {accelerator.device.type}; loader {loader_name} (decode {decode}); "
        f"global batch {global_batch_size}; {total_steps} steps"
        + (f"; resumed from {resumed_from} at step {progress.step} (restart {progress.restarts})" if resumed_from else "")
    )
    tracker.log({"run/restarts": progress.restarts, "run/world_size": world_size,
                 "run/global_batch_size": global_batch_size, "run/total_steps": total_steps}, step=progress.step)

    state = dict(accelerator=accelerator, model=model, unwrapped_model=unwrapped_model, ema_model=ema_model,
                 optimizer=optimizer, scheduler=scheduler, config=config, classes=classes, run_dir=run_dir,
                 progress=progress, tracker=tracker, micro_batches_per_epoch=steps_per_epoch * t.grad_accum_steps,
                 # first optimizer step whose loss was NaN/inf (0 = none); on the device, read only at sync points
                 first_nonfinite_step=torch.zeros((), dtype=torch.long, device=accelerator.device))
    exit_code = 1  # what W&B records if the loop raises
    try:
        exit_code = train_loop(state, train_loader, val_loader, total_steps, stop_request)
        check_ranks_agree(state)
    finally:
        train_loader.close()
        if val_loader is not None:
            val_loader.close()
        tracker.finish(exit_code=exit_code)
    if accelerator.is_main_process and exit_code == 0:
        if not (run_dir / "best").is_dir():  # no validation split: the last model is the export
            export_model(state)
        print(f"carbrand: done in {progress.step} steps; best {t.best_metric} {progress.best_metric:.4f} "
              f"at step {progress.best_step}; model in {run_dir / 'best'}")
    accelerator.end_training()
    return exit_code


def restore_training_state(checkpoint, model, optimizer, scheduler, accelerator) -> Progress:
    """Weights, optimizer, schedule, scaler and counters from a checkpoint; anything that does not fit is one line."""
    load_classifier_state(model, checkpoint.model_state, str(checkpoint.directory))
    saved = checkpoint.training_state
    try:
        progress = Progress(**saved["progress"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if accelerator.scaler is not None and saved.get("scaler"):
            accelerator.scaler.load_state_dict(saved["scaler"])
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise CarbrandError(f"{checkpoint.directory}: its training state does not fit this run ({type(error).__name__}: "
                            f"{reason}); was it written with another optim.name? use another output.dir or "
                            f"train.resume=never") from None
    return progress


def train_loop(state: dict, train_loader, val_loader, total_steps: int, stop_request: StopRequest) -> int:
    accelerator, progress = state["accelerator"], state["progress"]
    micro_batches_per_epoch = state["micro_batches_per_epoch"]
    bar = tqdm(total=total_steps, initial=progress.step, disable=not accelerator.is_main_process,
               unit="step", dynamic_ncols=True, desc="train")
    try:
        return run_epochs(state, train_loader, val_loader, total_steps, stop_request, bar, micro_batches_per_epoch)
    finally:
        bar.close()


def run_epochs(state: dict, train_loader, val_loader, total_steps: int, stop_request: StopRequest, bar,
               micro_batches_per_epoch: int) -> int:
    accelerator, model, optimizer, scheduler = state["accelerator"], state["model"], state["optimizer"], state["scheduler"]
    config, progress, ema_model = state["config"], state["progress"], state["ema_model"]
    t = config.train
    # "paused": seconds spent validating/checkpointing, kept out of images/s and the wait fraction
    window = {"loss": torch.zeros((), device=accelerator.device), "micro": 0, "images": 0, "wait": 0.0,
              "paused": 0.0, "start": time.perf_counter()}
    step_loss_nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)  # in this optimizer step
    while progress.step < total_steps:
        model.train()
        train_loader.set_epoch(progress.epoch, start_batch=progress.batch_in_epoch)
        batches = iter(train_loader)
        while progress.batch_in_epoch < micro_batches_per_epoch and progress.step < total_steps:
            wait_start = time.perf_counter()
            images, labels = next(batches)
            window["wait"] += time.perf_counter() - wait_start
            loss = train_step(accelerator, model, optimizer, images, labels, t.label_smoothing, config.optim.grad_clip_norm)
            window["loss"] += loss  # stays on the device: no host sync here
            step_loss_nonfinite |= ~torch.isfinite(loss)
            window["micro"] += 1
            window["images"] += images.shape[0]
            progress.batch_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            if accelerator.optimizer_step_was_skipped:
                # fp16 grad scaler found inf/NaN gradients and skipped the step (its routine): counted, not fatal;
                # the weights are untouched and the schedule does not advance
                progress.skipped_steps += 1
            else:
                scheduler.step()
                first = state["first_nonfinite_step"]  # remember the first applied step with a NaN/inf loss
                state["first_nonfinite_step"] = torch.where(step_loss_nonfinite & (first == 0), progress.step + 1, first)
            step_loss_nonfinite.zero_()
            if ema_model is not None:
                ema_model.update_parameters(state["unwrapped_model"])
            progress.step += 1
            bar.update(1)
            if progress.step % t.log_every == 0 or progress.step == total_steps:
                log_window(state, window, bar)
                if stop_request.should_stop(accelerator):
                    return stop_gracefully(state, stop_request)
            paused_from = time.perf_counter()
            if t.eval_every_steps and progress.step % t.eval_every_steps == 0:
                validate_and_keep_best(state, val_loader)
            if t.checkpoint_every_steps and progress.step % t.checkpoint_every_steps == 0:
                save_checkpoint(state)
            window["paused"] += time.perf_counter() - paused_from
        if progress.batch_in_epoch >= micro_batches_per_epoch:
            progress.epoch += 1
            progress.batch_in_epoch = 0
        paused_from = time.perf_counter()
        if not t.eval_every_steps or progress.step == total_steps:
            validate_and_keep_best(state, val_loader)
        save_checkpoint(state)
        window["paused"] += time.perf_counter() - paused_from
        if stop_request.should_stop(accelerator):
            return stop_gracefully(state, stop_request, already_saved=True)
    return 0


def train_step(accelerator, model, optimizer, images, labels, label_smoothing: float, grad_clip_norm: float) -> torch.Tensor:
    """One micro-batch: forward (autocast by Accelerate), backward, and on accumulation boundaries the step."""
    with accelerator.accumulate(model):
        logits = model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        accelerator.backward(loss)
        if grad_clip_norm > 0 and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), grad_clip_norm)
        optimizer.step()  # a no-op inside an accumulation window (Accelerate's optimizer wrapper)
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def log_window(state: dict, window: dict, bar) -> None:
    """Every `log_every` steps: the one place the loop syncs with the device."""
    accelerator, progress, tracker = state["accelerator"], state["progress"], state["tracker"]
    stop_if_diverged(state)
    mean_loss = accelerator.reduce(window["loss"], reduction="mean").item() / max(1, window["micro"])  # host sync
    # read the clock after the sync: before it, the device may still be running queued steps
    seconds = time.perf_counter() - window["start"] - window["paused"]
    images_per_second = window["images"] * accelerator.num_processes / max(seconds, 1e-9)
    metrics = {
        "train/loss": mean_loss,
        "train/lr": state["scheduler"].get_last_lr()[-1],  # the head's group: what is actually learning
        "train/images_per_second": images_per_second,
        "train/data_wait_fraction": window["wait"] / max(seconds, 1e-9),
        "train/epoch": progress.epoch + progress.batch_in_epoch / state["micro_batches_per_epoch"],
    }
    if accelerator.scaler is not None or progress.skipped_steps:
        metrics["train/skipped_steps"] = progress.skipped_steps  # fp16 scaler skips since the start of the run
    if accelerator.device.type == "cuda":
        metrics["train/gpu_memory_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    tracker.log(metrics, step=progress.step)
    bar.set_postfix(loss=f"{mean_loss:.3f}", img_s=f"{images_per_second:.0f}", refresh=False)
    window.update(loss=torch.zeros((), device=accelerator.device), micro=0, images=0, wait=0.0, paused=0.0,
                  start=time.perf_counter())


@torch.no_grad()
def validate(state: dict, loader) -> dict[str, float]:
    """Exact validation: every sample once across ranks; confusion matrices summed by all-reduce."""
    accelerator, num_classes = state["accelerator"], len(state["classes"])
    # The unwrapped module: DDP's forward would add collectives, and ranks hold different batch counts.
    model = state["ema_model"].module if state["ema_model"] is not None else state["unwrapped_model"]
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=accelerator.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    with accelerator.autocast():
        for images, labels, _ in loader:
            logits = model(images).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            confusion += confusion_matrix(logits.argmax(dim=1), labels, num_classes)
    model.train(was_training)
    confusion = accelerator.reduce(confusion, reduction="sum")
    loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    summary = summarize(confusion)
    summary["loss"] = loss_sum.item() / max(1, summary["samples"])  # host sync: once per validation
    return summary


def validate_and_keep_best(state: dict, loader) -> None:
    if loader is None:
        return
    progress, config = state["progress"], state["config"]
    stop_if_diverged(state)  # a diverged model must not become best/
    summary = validate(state, loader)
    state["tracker"].log({f"val/{k}": v for k, v in summary.items()} | {"epoch": progress.epoch}, step=progress.step)
    score = summary[config.train.best_metric]
    state["accelerator"].print(
        f"carbrand: step {progress.step} epoch {progress.epoch}: val accuracy {summary['accuracy']:.4f} "
        f"macro-F1 {summary['macro_f1']:.4f} loss {summary['loss']:.4f} ({summary['samples']} images)")
    if score > progress.best_metric:
        progress.best_metric, progress.best_step = score, progress.step
        export_model(state)


def export_model(state: dict) -> None:
    """best/: plain, uncompiled, unwrapped weights (EMA if enabled) + classes + config."""
    if not state["accelerator"].is_main_process:
        return
    source = state["ema_model"].module if state["ema_model"] is not None else state["unwrapped_model"]
    save_export(state["run_dir"] / "best", plain_state_dict(source), state["classes"], state["config"])


def stop_if_diverged(state: dict) -> None:
    """Before logging, validating or saving: stop if any rank applied a NaN/inf loss or holds NaN/inf weights.

    One small gather (a host sync) at points that sync anyway, so nothing from a blown-up step
    is ever saved: the newest checkpoint is always from before it.
    """
    accelerator, progress = state["accelerator"], state["progress"]
    weights_finite = torch.stack([p.detach().isfinite().all() for p in state["unwrapped_model"].parameters()]).all()
    local = torch.stack([state["first_nonfinite_step"], (~weights_finite).long()]).reshape(1, 2)
    found = accelerator.gather(local)  # one row per rank: first non-finite step (0 = none), weights non-finite
    steps = [s for s in found[:, 0].tolist() if s > 0]
    if not steps and not found[:, 1].any():
        return
    what = (f"the loss became NaN or inf at step {min(steps)}" if steps
            else f"the weights became NaN or inf by step {progress.step}")
    saved = step_checkpoints(state["run_dir"])
    newest = f"{saved[-1][1]} (step {saved[-1][0]})" if saved else "none yet"
    raise CarbrandError(f"training diverged: {what}; stopped without saving it. Newest checkpoint, from before: {newest}. "
                        f"Lower optim.lr, raise optim.warmup_epochs or set optim.grad_clip_norm")


def save_checkpoint(state: dict) -> None:
    accelerator, progress, config = state["accelerator"], state["progress"], state["config"]
    stop_if_diverged(state)
    if accelerator.is_main_process:
        training_state = {
            "progress": vars(progress).copy(),
            "optimizer": state["optimizer"].state_dict(),
            "scheduler": state["scheduler"].state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "world_size": accelerator.num_processes,
        }
        ema = plain_state_dict(state["ema_model"].module) if state["ema_model"] is not None else None
        save_training_checkpoint(state["run_dir"], progress.step, plain_state_dict(state["unwrapped_model"]), ema,
                                 training_state, state["classes"], config, keep=config.train.keep_checkpoints)
    accelerator.wait_for_everyone()  # nobody exits or resumes before the checkpoint is complete


def check_ranks_agree(state: dict) -> None:
    """Once, at the end: every rank must hold the same weights, or DDP silently diverged."""
    accelerator = state["accelerator"]
    checksum = torch.stack([p.detach().double().sum() for p in state["unwrapped_model"].parameters()]).sum()
    checksums = accelerator.gather(checksum.reshape(1))
    agree = bool(torch.allclose(checksums, checksums[0].expand_as(checksums), rtol=1e-6, atol=1e-6))
    state["tracker"].log({"run/ranks_agree": agree, "run/parameter_checksum": checksums[0].item()},
                         step=state["progress"].step)
    if not agree:
        raise CarbrandError(f"ranks hold different weights at the end of training (checksums {checksums.tolist()})")


def stop_gracefully(state: dict, stop_request: StopRequest, already_saved: bool = False) -> int:
    if not already_saved:
        save_checkpoint(state)
    # counted after the save: a signal sent to all ranks has reached all of them by now
    accelerator, step = state["accelerator"], state["progress"].step
    ranks_signalled = stop_request.ranks_signalled(accelerator)
    state["tracker"].log({"run/stop_signal": stop_request.received or 0, "run/ranks_signalled": ranks_signalled}, step=step)
    # the main process may not be the rank that received the signal
    received = signal.Signals(stop_request.received).name if stop_request.received else "a signal to another rank"
    accelerator.print(f"carbrand: stop requested ({received}); checkpoint saved at step {step}; "
                      f"resume with train.resume=auto ({ranks_signalled} of {accelerator.num_processes} ranks got the signal)")
    return EXIT_CODE_PREEMPTED


def main(argv: list[str] | None = None) -> int:
    from carbrand.cli import run_command

    return run_command("train", argv)


if __name__ == "__main__":
    sys.exit(main())
