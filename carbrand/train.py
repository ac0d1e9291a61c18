"""Train a car-brand classifier (ResNet-50 by default) with Accelerate DDP, AMP and channels-last.

    accelerate launch carbrand/train.py        # configs/default.yaml on the demo data (`carbrand demo` first)
    accelerate launch carbrand/train.py --config configs/stanford_cars.yaml
    accelerate launch --multi_gpu --num_processes 8 carbrand/train.py --config configs/stanford_cars.yaml optim.lr=0.2
    accelerate launch --multi_gpu --num_processes 2 carbrand/train.py --config configs/cars5_cpu.yaml
    torchrun --nproc-per-node 8 carbrand/train.py --config configs/stanford_cars.yaml
    python -m carbrand.train --config configs/demo.yaml      (same as `carbrand train --config ...`)

Reads top to bottom: config (its precision auto resolved for this machine) -> accelerator ->
data -> model -> optimizer -> schedule -> resume -> prepare -> EMA -> tracker (`set_up`), then
`train_loop` (step; at sync points the finiteness check, log, stop request, validation,
checkpoint), then the export.

The ranks hold one model: DDP keeps the weights equal, `synchronize_buffers` the BatchNorm
statistics (each rank's follow its own shard) before anything is validated, saved or exported,
and `check_ranks_agree` compares every tensor, bit for bit, at the end.
"""

from __future__ import annotations

from carbrand.command_line import rerun_as_module, run_command_module

if __name__ == "__main__" and not __package__:  # the file, given to accelerate launch or torchrun
    rerun_as_module("carbrand.train")  # before any other import: see rerun_as_module

import argparse  # noqa: E402 - after the re-run above, as are the imports below
import dataclasses
import datetime
import hashlib
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    GradScalerKwargs,
    InitProcessGroupKwargs,
    TorchDynamoPlugin,
    broadcast,
    gather_object,
    set_seed,
)
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from carbrand.car_models import CAR_MODELS_FILE, CarModel, brand_indices
from carbrand.checkpoint import (
    EMA_FILE,
    TrainingCheckpoint,
    agreed_resume_checkpoint,
    load_resume_checkpoint,
    plain_state_dict,
    save_export,
    save_training_checkpoint,
)
from carbrand.config import Config, load_config, save_config
from carbrand.data.loader_base import EvalLoader, TrainLoader
from carbrand.data.loaders import build_eval_loader, build_train_loader, resolve_backend
from carbrand.data.manifest import PreparedDataset, Sample, load_prepared, read_manifest, recorded_max_pixels
from carbrand.errors import CarbrandError, ConfigError, DataError, first_line
from carbrand.evaluation.calibrate import calibrate_run
from carbrand.filesystem import check_run_dir_writable
from carbrand.inference.classifier import average_crops, crop_batch
from carbrand.metrics import confusion_matrix, summarize
from carbrand.model import BrandsFromCarModels, build_model, convert_sync_batchnorm, load_classifier_state
from carbrand.precision import PrecisionChoice, choose_precision, cpu_bf16_warning, input_dtype
from carbrand.tracking import Tracker
from carbrand.training.divergence import DivergenceGuard, ScalerSkips
from carbrand.training.heartbeat import Heartbeat
from carbrand.training.mixing import NO_MIX, Mix, apply_mix, draw_mix, mixed_cross_entropy, mixing_summary
from carbrand.training.optimization import Schedule, build_optimizer, build_scheduler, peak_learning_rate, set_train_mode
from carbrand.training.preemption import EXIT_CODE_PREEMPTED, StopRequest
from carbrand.training.run_lock import RunDirLock, lock_run_dir
from carbrand.training.throughput import ThroughputWindow

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "configs" / "default.yaml"  # what `accelerate launch carbrand/train.py` trains with no --config


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


@dataclass
class Run:
    """Everything one training run works with, built once by `set_up` (typed: a typo fails where it is written)."""

    config: Config
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared: DDP-wrapped when distributed, compiled when asked
    unwrapped_model: torch.nn.Module  # the plain module: validation, checksums, checkpoints
    ema_model: AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: TrainLoader
    val_loader: EvalLoader | None
    classes: list[str]
    car_models: list[CarModel] | None  # data.labels car_model: the head's outputs, summed into `classes` by `to_brands`
    to_brands: BrandsFromCarModels | None
    run_dir: Path
    tracker: Tracker
    progress: Progress
    total_steps: int
    micro_batches_per_epoch: int
    divergence: DivergenceGuard
    scaler_skips: ScalerSkips

    @property
    def scored_model(self) -> torch.nn.Module:
        """What validation scores and best/ exports: the EMA weights when enabled."""
        return self.ema_model.module if self.ema_model is not None else self.unwrapped_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML recipe, e.g. configs/cars5_cpu.yaml (default: configs/default.yaml)")
    parser.add_argument("--force-unlock", action="store_true",
                        help="take over output.dir's lock left by a training on another host that is gone")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=0.05")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config or DEFAULT_RECIPE, args.overrides)
    if args.config is None and not Path(config.data.manifest).exists():
        raise DataError(f"no dataset at {config.data.manifest}, where {DEFAULT_RECIPE.relative_to(REPO)} trains: run `carbrand demo` "
                        "to make it, or `carbrand prepare SOURCE --out DIR` and then --config with data.manifest=DIR")
    return train(config, force_unlock=args.force_unlock)


def make_accelerator(config: Config) -> Accelerator:
    t = config.train
    assert t.precision != "auto", "train.precision is resolved before the Accelerator is made (train does)"
    if t.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.precision' is fp16, which needs a CUDA GPU; use auto or no on a CPU")
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = t.cudnn_benchmark  # fixed input shapes: autotune once
        torch.backends.cuda.matmul.allow_tf32 = t.tf32
        torch.backends.cudnn.allow_tf32 = t.tf32
    handlers = [
        # bucket views: gradients live inside DDP's all-reduce buckets, saving one copy per step.
        # No buffer broadcast at every forward: `synchronize_buffers` averages them where it matters.
        DistributedDataParallelKwargs(gradient_as_bucket_view=True, broadcast_buffers=False),
        # a dead or stuck rank makes the others fail after this long instead of hanging forever
        InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=t.collective_timeout_s)),
    ]
    if t.precision == "fp16":
        handlers.append(GradScalerKwargs(init_scale=t.fp16_init_scale))
    accelerator = Accelerator(
        # without cpu=True, processes launched on a GPU-less host do not join one gloo group
        cpu=not torch.cuda.is_available(),
        mixed_precision=t.precision,
        gradient_accumulation_steps=t.grad_accum_steps,
        kwargs_handlers=handlers,
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if config.model.compile else None,
        step_scheduler_with_optimizer=False,
    )
    warning = cpu_bf16_warning(t.precision, accelerator.device)
    if warning and accelerator.is_main_process:  # once per run, not once per rank
        print(warning)
    return accelerator


def train(config: Config, force_unlock: bool = False) -> int:
    config, precision = with_resolved_precision(config)
    config = with_dataset_pixel_limit(config)
    accelerator = make_accelerator(config)
    heartbeat = Heartbeat(accelerator.process_index, accelerator.num_processes)
    # Installed for the whole run: the SIGTERM a launcher sends survivors when a peer dies is then
    # only recorded, and this rank still gets to say which peer was lost.
    stop_request = StopRequest(deadline_s=config.train.stop_deadline_s, run_dir=Path(config.output.dir))
    run_lock = RunDirLock(Path(config.output.dir), force=force_unlock)  # taken by set_up before the first write
    try:
        return train_with(config, accelerator, stop_request, run_lock, precision=precision)
    except RuntimeError as error:
        # A collective failed (a peer's connection reset) or timed out: name the lost rank in one line.
        lost = heartbeat.describe_lost_peers() if accelerator.num_processes > 1 else None
        if lost is None:
            raise  # every peer is alive: a genuine bug, keep its traceback
        # gloo/NCCL messages start with a source location and end in advice: keep the first sentence
        reason = re.sub(r"^\[[^\]]*\]\s*", "", first_line(error)).split(". ")[0][:160]
        raise CarbrandError(f"rank {accelerator.process_index} stops: {lost}; a collective failed ({reason}); "
                            f"restart the job to resume from the newest checkpoint") from None
    finally:
        run_lock.release()
        stop_request.restore()
        heartbeat.stop()


def with_resolved_precision(config: Config) -> tuple[Config, PrecisionChoice]:
    """The config with train.precision auto replaced by what this machine trains in (no | bf16 | fp16), and why.

    Once per run, before anything reads it: Accelerate, the loaders, the run's config.yaml, W&B, every
    checkpoint and the export all hold the resolved name, never auto. A saved config is the one in effect,
    and an export's precision is what its weights were trained in, which evaluate and predict reuse on a GPU
    (`--precision auto`); an export whose config says auto would leave them to guess.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the device make_accelerator picks
    precision = choose_precision(config.train.precision, device)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, precision=precision.name)), precision


def with_dataset_pixel_limit(config: Config) -> Config:
    """The config with data.max_pixels set to the limit prepare applied (manifest.json), the one pixel limit.

    The run's config.yaml, every checkpoint and the export then hold the number, so evaluate, predict
    and serve refuse exactly what prepare rejected and the loaders refused. A different number in the
    config is an error: two limits would let one step accept what the next refuses.
    """
    directory = Path(config.data.manifest)
    recorded = recorded_max_pixels(directory, read_manifest(directory))
    if config.data.max_pixels not in (0, recorded):
        raise ConfigError(f"config key 'data.max_pixels' ({config.data.max_pixels}) differs from the {recorded} pixels "
                          f"{directory / 'manifest.json'} was prepared with; leave it 0, or run `carbrand prepare "
                          f"--max-pixels` again to change the limit")
    return dataclasses.replace(config, data=dataclasses.replace(config.data, max_pixels=recorded))


def train_with(config: Config, accelerator: Accelerator, stop_request: StopRequest, run_lock: RunDirLock | None = None,
               *, precision: PrecisionChoice) -> int:
    run = set_up(config, accelerator, run_lock, precision=precision)
    exit_code = 1  # what W&B records if the loop raises
    try:
        exit_code = train_loop(run, stop_request)
        check_ranks_agree(run)
        if exit_code == 0:
            calibrate_run(run)  # best/calibration.json: temperature and "unknown" threshold, fitted on val
    finally:
        run.train_loader.close()
        if run.val_loader is not None:
            run.val_loader.close()
        run.tracker.finish(exit_code=exit_code)
    if accelerator.is_main_process and exit_code == 0:
        if not (run.run_dir / "best").is_dir():  # no validation split: the last model is the export
            export_model(run)
        chosen = ("the final weights" if config.train.best_metric == "last" else
                  f"best {config.train.best_metric} {run.progress.best_metric:.4f} at step {run.progress.best_step}")
        print(f"carbrand: done in {run.progress.step} steps; {chosen}; model in {run.run_dir / 'best'}")
    accelerator.end_training()
    return exit_code


def set_up(config: Config, accelerator: Accelerator, run_lock: RunDirLock | None = None, *, precision: PrecisionChoice) -> Run:
    """Data -> model -> optimizer -> schedule -> resume -> lock -> prepare -> EMA -> tracker, in that order.

    Every input, the resume checkpoint included, is read and checked before the run
    directory is touched: bad input writes nothing.
    """
    run_dir = Path(config.output.dir)
    t, m, world_size, rank = config.train, config.model, accelerator.num_processes, accelerator.process_index

    # Data: every rank reads the same manifest; loaders shard by global rank.
    dataset = load_prepared(config.data.manifest)
    classes, train_samples, val_samples = dataset.classes, dataset.split("train"), dataset.splits.get("val", [])
    if not train_samples:
        raise CarbrandError(f"{dataset.directory}: the train split is empty")
    car_models = None
    if config.data.labels == "car_model":  # validation keeps the brands: it scores what users get
        car_models, train_samples = car_model_samples(train_samples, dataset)
    backend = resolve_backend(config.data, accelerator.device)  # once per run: one notice, one answer
    loader_options = dict(backend=backend, rank=rank, world_size=world_size, device=accelerator.device,
                          dtype=input_dtype(t.precision), channels_last=t.channels_last)
    train_loader = build_train_loader(config.data, train_samples, seed=t.seed, **loader_options)
    val_loader = build_eval_loader(config.data, val_samples, **loader_options) if val_samples else None
    if val_loader is None:
        accelerator.print("carbrand: warning: no validation split; best/ will hold the last model")

    # Model and optimizer. Seeds: base + global rank, so no two ranks draw the same stream.
    set_seed(t.seed + rank)
    num_outputs = len(car_models) if car_models is not None else len(classes)
    model = build_model(m.arch, num_outputs, m.pretrained, m.pretrained_key_map, m.drop_rate, m.drop_path_rate)
    if config.model.sync_batchnorm and world_size > 1:
        model = convert_sync_batchnorm(model)
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
                        min_lr_ratio=config.optim.min_lr_ratio, backbone_lr_scale=config.optim.backbone_lr_scale)
    optimizer = build_optimizer(model, config.optim, peak_learning_rate(config.optim, global_batch_size), accelerator.device)
    scheduler = build_scheduler(optimizer, schedule)

    # Resume before prepare: DDP then broadcasts the loaded weights to every rank (Accelerate moves optimizer state).
    # Rank 0 picks the checkpoint for all: ranks listing a shared file system can see different newest ones.
    progress, checkpoint = Progress(), None
    resumed_from = agreed_resume_checkpoint(accelerator, run_dir, t.resume)
    if resumed_from is not None:
        checkpoint = load_resume_checkpoint(accelerator, resumed_from)
        progress = restore_training_state(checkpoint, model, optimizer, scheduler, accelerator, world_size)
    # Every input is read and valid: only now touch the disk, and fail here, not hours later, if it cannot be written.
    if run_lock is not None:  # one writer per run directory: rank 0 takes the lock, the others wait for its answer
        lock_run_dir(accelerator, run_lock, t.resume, resumed_from)
    if accelerator.is_main_process:
        check_run_dir_writable(run_dir)
        save_config(config, run_dir / "config.yaml")
    model, optimizer = accelerator.prepare(model, optimizer)
    # The plain module, also under model.compile: by default Accelerate keeps the compiled wrapper (state-dict keys
    # with `_orig_mod.`) and points it at the plain module, hiding DDP's no_sync (an all-reduce every micro-batch).
    unwrapped_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    ema_model = make_ema(unwrapped_model, t.ema_decay, checkpoint, progress)

    tracker = Tracker(run_dir, config, is_main=accelerator.is_main_process)
    accelerator.print(
        f"carbrand: {len(train_samples)} train / {len(val_samples)} val images, {len(classes)} brands"
        + (f" (learnt as {len(car_models)} car models)" if car_models is not None else "") + "; "
        f"{world_size} process(es) on {accelerator.device.type}; loader {backend.loader} (decode {backend.decode}); "
        f"global batch {global_batch_size}; {total_steps} steps; precision {precision}; augment {config.data.augment}; "
        f"{mixing_summary(t)}"
        + (f"; resumed from {resumed_from} at step {progress.step} (restart {progress.restarts})" if resumed_from else ""))
    tracker.log({"run/restarts": progress.restarts, "run/world_size": world_size,
                 "run/global_batch_size": global_batch_size, "run/total_steps": total_steps}, step=progress.step)
    return Run(config=config, accelerator=accelerator, model=model, unwrapped_model=unwrapped_model, ema_model=ema_model,
               optimizer=optimizer, scheduler=scheduler, train_loader=train_loader, val_loader=val_loader,
               classes=classes, car_models=car_models, to_brands=brand_summer(car_models, classes, accelerator.device),
               run_dir=run_dir, tracker=tracker, progress=progress, total_steps=total_steps,
               micro_batches_per_epoch=steps_per_epoch * t.grad_accum_steps,
               divergence=DivergenceGuard(accelerator.device), scaler_skips=ScalerSkips(accelerator.scaler))


def car_model_samples(samples: list[Sample], dataset: PreparedDataset) -> tuple[list[CarModel], list[Sample]]:
    """(the dataset's car models, `samples` labelled by car model); a dataset without car models is a config error."""
    if dataset.car_models is None:
        raise ConfigError(f"config key 'data.labels': car_model needs a dataset prepared with car models (the stanford-cars "
                          f"format keeps them); {dataset.directory} has no {CAR_MODELS_FILE}")
    return dataset.car_models, [dataclasses.replace(sample, label=sample.car_model) for sample in samples]


def brand_summer(car_models: list[CarModel] | None, classes: list[str], device: torch.device) -> BrandsFromCarModels | None:
    if car_models is None:
        return None
    return BrandsFromCarModels(brand_indices(car_models, classes), len(classes)).to(device)


def make_ema(unwrapped_model, decay: float, checkpoint: TrainingCheckpoint | None, progress: Progress) -> AveragedModel | None:
    """The EMA of the weights (buffers included), continued from the checkpoint when it holds one."""
    if decay <= 0:
        return None
    ema_model = AveragedModel(unwrapped_model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    if checkpoint is not None and checkpoint.ema_state is not None:
        load_classifier_state(ema_model.module, checkpoint.ema_state, str(checkpoint.directory / EMA_FILE))
        # With its count at 0 the next update would copy the live weights over the restored average.
        # Checkpoints from before the count was saved: the EMA is updated once per optimizer step.
        updates = checkpoint.training_state.get("ema_updates")
        ema_model.n_averaged.fill_(progress.step if updates is None else int(updates))
    return ema_model


def restore_training_state(checkpoint, model, optimizer, scheduler, accelerator, world_size: int) -> Progress:
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
        raise CarbrandError(f"{checkpoint.directory}: its training state does not fit this run ({type(error).__name__}: "
                            f"{first_line(error, 160)}); was it written with another optim.name? use another output.dir "
                            f"or train.resume=never") from None
    progress.restarts += 1
    if saved.get("world_size") != world_size and progress.batch_in_epoch:
        # the position inside the epoch was counted in the old shards: redo this epoch's data from its start
        accelerator.print(f"carbrand: warning: resuming with {world_size} processes instead of "
                          f"{saved.get('world_size')}; epoch {progress.epoch} restarts its data order")
        progress.batch_in_epoch = 0
    return progress


def train_loop(run: Run, stop_request: StopRequest) -> int:
    """The epochs and steps: forward/backward/step, then at sync points the finiteness check, the log,
    the stop request, validation and checkpoints. Returns the exit code (0, or 143 when stopped)."""
    accelerator, progress, t = run.accelerator, run.progress, run.config.train
    window = ThroughputWindow(accelerator.device)
    bar = tqdm(total=run.total_steps, initial=progress.step, disable=not accelerator.is_main_process,
               unit="step", dynamic_ncols=True, desc="train")
    try:
        while progress.step < run.total_steps:
            set_train_mode(run.model, freeze_batchnorm=run.config.model.freeze_batchnorm)
            run.train_loader.set_epoch(progress.epoch, start_batch=progress.batch_in_epoch)
            batches = iter(run.train_loader)
            while progress.batch_in_epoch < run.micro_batches_per_epoch and progress.step < run.total_steps:
                with window.waiting_for_data():
                    images, labels = next(batches)
                # this micro-batch's own mixup/CutMix draw, a function of (seed, rank, epoch, batch): resumable
                mix = draw_mix(t, rank=accelerator.process_index, epoch=progress.epoch, batch=progress.batch_in_epoch,
                               batch_size=images.shape[0], image_size=images.shape[-1])
                loss = train_step(accelerator, run.model, run.optimizer, images, labels,
                                  t.label_smoothing, run.config.optim.grad_clip_norm, mix)
                window.add(loss, images.shape[0])
                run.divergence.observe_loss(loss)
                progress.batch_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue  # inside a gradient-accumulation window: no optimizer step yet
                finish_optimizer_step(run)
                bar.update(1)

                last_step = progress.step == run.total_steps
                at_log = progress.step % t.log_every == 0 or last_step
                # The epoch end below validates the run's last step and saves every epoch's last one: not here too.
                at_eval = bool(t.eval_every_steps) and progress.step % t.eval_every_steps == 0 and not last_step
                at_save = (bool(t.checkpoint_every_steps) and progress.step % t.checkpoint_every_steps == 0
                           and not (last_step or progress.batch_in_epoch >= run.micro_batches_per_epoch))
                if at_log or at_eval or at_save:
                    check_finite(run)  # sync point: nothing from a diverged step is logged, kept or saved
                if at_log:
                    log_window(run, window, bar)
                    if stop_request.should_stop(accelerator):
                        save_checkpoint(run)
                        return report_stop(run, stop_request)
                with window.paused():
                    if at_eval:
                        validate_and_keep_best(run)
                    if at_save:
                        save_checkpoint(run)

            if progress.batch_in_epoch >= run.micro_batches_per_epoch:
                progress.epoch += 1
                progress.batch_in_epoch = 0
            with window.paused():  # epoch end (or max_steps): validate, checkpoint, then honour a stop request
                check_finite(run)
                if not t.eval_every_steps or progress.step == run.total_steps:
                    validate_and_keep_best(run)
                save_checkpoint(run)
            if stop_request.should_stop(accelerator):
                return report_stop(run, stop_request)
        return 0
    finally:
        bar.close()


def train_step(accelerator, model, optimizer, images, labels, label_smoothing: float, grad_clip_norm: float,
               mix: Mix = NO_MIX) -> torch.Tensor:
    """One micro-batch: mix, forward (autocast by Accelerate), backward, and on accumulation boundaries the step."""
    with accelerator.accumulate(model):
        images, partner_labels = apply_mix(images, labels, mix)
        logits = model(images)
        loss = mixed_cross_entropy(logits, labels, partner_labels, mix.weight, label_smoothing)
        accelerator.backward(loss)
        if grad_clip_norm > 0 and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), grad_clip_norm)
        optimizer.step()  # a no-op inside an accumulation window (Accelerate's optimizer wrapper)
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def finish_optimizer_step(run: Run) -> None:
    """After an optimizer step: the schedule, the divergence marks, the EMA and the step counter."""
    progress = run.progress
    applied = not run.scaler_skips.step_was_skipped(run.accelerator)
    if applied:
        run.scheduler.step()
    else:
        # fp16 grad scaler found inf/NaN gradients and skipped the step (its routine): counted, not fatal;
        # the weights are untouched and the schedule does not advance
        progress.skipped_steps += 1
    run.divergence.end_step(progress.step + 1, applied)
    if run.ema_model is not None:
        run.ema_model.update_parameters(run.unwrapped_model)
    progress.step += 1


def check_finite(run: Run) -> None:
    run.divergence.check(run.accelerator, run.unwrapped_model, run.progress.step, run.run_dir)


def log_window(run: Run, window: ThroughputWindow, bar) -> None:
    """Every `log_every` steps: the one place the loop syncs with the device."""
    accelerator, progress = run.accelerator, run.progress
    mean_loss = accelerator.reduce(window.loss_sum, reduction="mean").item() / max(1, window.micro_batches)  # host sync
    seconds = window.training_seconds()  # after the sync: the queued steps are done
    images_per_second = window.images * accelerator.num_processes / seconds
    metrics = {
        "train/loss": mean_loss,
        "train/lr": run.scheduler.get_last_lr()[-1],  # the head's group: what is actually learning
        "train/images_per_second": images_per_second,
        "train/data_wait_fraction": window.data_wait_seconds / seconds,
        "train/epoch": progress.epoch + progress.batch_in_epoch / run.micro_batches_per_epoch,
    }
    if accelerator.scaler is not None or progress.skipped_steps:
        metrics["train/skipped_steps"] = progress.skipped_steps  # fp16 scaler skips since the start of the run
    if progress.restarts:
        # again at every log: a resumed W&B run drops what set_up logged at the resume step, which it had seen
        metrics["run/restarts"] = progress.restarts
    if accelerator.device.type == "cuda":
        metrics["train/gpu_memory_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    run.tracker.log(metrics, step=progress.step)
    bar.set_postfix(loss=f"{mean_loss:.3f}", img_s=f"{images_per_second:.0f}", refresh=False)
    window.reset()


@torch.no_grad()
def validate(run: Run) -> dict[str, float]:
    """Exact validation: every sample once across ranks; confusion matrices summed by all-reduce."""
    accelerator, num_classes = run.accelerator, len(run.classes)
    # The unwrapped module: DDP's forward would add collectives, and ranks hold different batch counts.
    model = run.scored_model
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=accelerator.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    with accelerator.autocast():
        for images, labels, _ in run.val_loader:
            images, crops = crop_batch(images)  # data.eval_crops: validation scores what evaluate will
            logits = model(images).float()
            if run.to_brands is not None:
                logits = run.to_brands(logits)
            logits = average_crops(logits, crops)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            confusion += confusion_matrix(logits.argmax(dim=1), labels, num_classes)
    if was_training:
        set_train_mode(model, freeze_batchnorm=run.config.model.freeze_batchnorm)
    confusion = accelerator.reduce(confusion, reduction="sum")
    loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    summary = summarize(confusion)
    summary["loss"] = loss_sum.item() / max(1, summary["samples"])  # host sync: once per validation
    return summary


def validate_and_keep_best(run: Run) -> None:
    """Validate; a new best score replaces best/. The caller has checked the weights are finite."""
    if run.val_loader is None:
        return
    progress = run.progress
    synchronize_buffers(run)  # one model scores every shard, and best/ holds that model
    summary = validate(run)
    run.tracker.log({f"val/{k}": v for k, v in summary.items()} | {"epoch": progress.epoch}, step=progress.step)
    run.accelerator.print(
        f"carbrand: step {progress.step} epoch {progress.epoch}: val accuracy {summary['accuracy']:.4f} "
        f"macro-F1 {summary['macro_f1']:.4f} loss {summary['loss']:.4f} ({summary['samples']} images)")
    metric = run.config.train.best_metric
    # "last": every validation replaces best/, which ends as the final weights. On a val split of a few dozen
    # photos the best-scoring step is chosen by noise: on cars5 (30 val photos) the final weights scored
    # higher on test in 16 of 20 runs (docs/TRAINING.md).
    score = summary["accuracy" if metric == "last" else metric]
    if metric == "last" or score > progress.best_metric:
        progress.best_metric, progress.best_step = score, progress.step
        export_model(run)


def export_model(run: Run) -> None:
    """best/: plain, uncompiled, unwrapped weights (EMA if enabled) + classes + config."""
    if run.accelerator.is_main_process:
        save_export(run.run_dir / "best", plain_state_dict(run.scored_model), run.classes, run.config, run.car_models)


def save_checkpoint(run: Run) -> None:
    """A complete step checkpoint (the caller has checked the weights are finite); every rank waits for it."""
    accelerator, progress = run.accelerator, run.progress
    synchronize_buffers(run)  # rank 0 saves: its buffers must be everyone's
    if accelerator.is_main_process:
        training_state = {
            "progress": vars(progress).copy(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "world_size": accelerator.num_processes,
            # the EMA's update count: a resumed EMA goes on averaging instead of restarting from the live weights
            "ema_updates": int(run.ema_model.n_averaged) if run.ema_model is not None else None,
        }
        ema = plain_state_dict(run.ema_model.module) if run.ema_model is not None else None
        save_training_checkpoint(run.run_dir, progress.step, plain_state_dict(run.unwrapped_model), ema,
                                 training_state, run.classes, run.config, keep=run.config.train.keep_checkpoints,
                                 car_models=run.car_models)
    accelerator.wait_for_everyone()  # nobody exits or resumes before the checkpoint is complete


@torch.no_grad()
def synchronize_buffers(run: Run) -> None:
    """Give every rank the same buffers (the EMA's too) before they are scored, saved or compared (collectives).

    DDP runs without broadcasting buffers at every forward, so each rank's BatchNorm running
    statistics follow its own shard. Floating-point buffers are averaged (one all-reduce per
    dtype); the others (num_batches_tracked, the EMA's count) advance alike on every rank and
    are taken from rank 0 so that they are equal by construction.
    """
    accelerator = run.accelerator
    if accelerator.num_processes == 1:
        return
    modules = [run.unwrapped_model] + ([run.ema_model] if run.ema_model is not None else [])
    buffers = [b for module in modules for b in module.buffers()]
    for dtype in sorted({b.dtype for b in buffers}, key=str):
        group = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.reshape(-1) for b in group])
        flat = accelerator.reduce(flat, reduction="mean") if dtype.is_floating_point else broadcast(flat, from_process=0)
        for buffer, value in zip(group, flat.split([b.numel() for b in group])):
            buffer.copy_(value.view_as(buffer))


def state_digests(run: Run) -> dict[str, str]:
    """A short hash of every tensor of the state, weights and buffers, the EMA's under `ema.`: equal bits, equal hash."""
    states = {"": run.unwrapped_model.state_dict()}
    if run.ema_model is not None:
        states["ema."] = run.ema_model.state_dict()
    digests = {}
    for prefix, state in states.items():
        for name, tensor in state.items():
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            digests[prefix + name] = hashlib.sha256(data.numpy()).hexdigest()[:16]
    return digests


def check_ranks_agree(run: Run) -> None:
    """Once, at the end: every rank must hold the very same state, bit for bit, or the replicas silently diverged."""
    local = state_digests(run)  # host copies of the whole state: once per run
    ranks = gather_object([local]) if run.accelerator.num_processes > 1 else [local]
    different = sorted({name for digests in ranks[1:] for name in local if digests.get(name) != ranks[0].get(name)})
    state_digest = hashlib.sha256("".join(ranks[0].values()).encode()).hexdigest()[:16]
    run.tracker.log({"run/ranks_agree": not different, "run/state_digest": state_digest}, step=run.progress.step)
    if different:
        raise CarbrandError(f"ranks hold different states at the end of training: {len(different)} of {len(local)} "
                            f"tensors differ (e.g. {', '.join(different[:3])})")


def report_stop(run: Run, stop_request: StopRequest) -> int:
    """After the stop checkpoint: say which signal and how many ranks got it; exit code 143."""
    # counted after the save: a signal sent to all ranks has reached all of them by now
    accelerator, step = run.accelerator, run.progress.step
    ranks_signalled = stop_request.ranks_signalled(accelerator)
    run.tracker.log({"run/stop_signal": stop_request.received or 0, "run/ranks_signalled": ranks_signalled}, step=step)
    # the main process may not be the rank that received the signal
    received = signal.Signals(stop_request.received).name if stop_request.received else "a signal to another rank"
    accelerator.print(f"carbrand: stop requested ({received}); checkpoint saved at step {step}; "
                      f"resume with train.resume=auto ({ranks_signalled} of {accelerator.num_processes} ranks got the signal)")
    return EXIT_CODE_PREEMPTED


def main(argv: list[str] | None = None) -> int:
    return run_command_module("train", sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
