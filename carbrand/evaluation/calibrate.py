"""Fit the temperature and the "unknown" threshold of an export on a validation split (calibration.json).

    carbrand calibrate --checkpoint runs/cars/best --data prepared/cars                 # the val split
    accelerate launch -m carbrand.evaluation.calibrate --checkpoint runs/cars/best --data prepared/cars
    carbrand calibrate --checkpoint runs/cars/best --data prepared/cars --split test --keep-share 0.9

Training does the same when it ends (best/ and the val split). Each process predicts its shard
of the split; the logits of every image are gathered to every process in sample order, each
process fits, the fits are compared (they must agree bit for bit: same numbers, same float64
arithmetic), and the main process's value is broadcast and written. Images of brands the model
does not know are left out. See calibration.py for the threshold rule. Every process reads the
export from disk, so on several nodes the run directory must be shared (as resuming already needs).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from carbrand.checkpoint import load_export, load_export_model
from carbrand.command_line import run_command_module
from carbrand.data.loaders import build_eval_loader, resolve_backend
from carbrand.data.manifest import load_prepared
from carbrand.errors import DataError, UsageError
from carbrand.inference.calibration import KEEP_KNOWN_SHARE, Calibration, fit_calibration, save_calibration
from carbrand.inference.classifier import classify, inference_precision, place_model
from carbrand.precision import input_dtype


@dataclasses.dataclass(frozen=True)
class AgreedCalibration:
    calibration: Calibration
    ranks_agree: bool  # every rank fitted the same temperature and threshold from the gathered logits


def gathered_logits(accelerator, model, loader, label_map: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, model labels) of every known-brand image of the split, in sample order, on every rank.

    `label_map[data_label]` is the model's label of a data label (-1: a brand the model does not know).
    """

    indices, logits, labels = [], [], []
    for images, batch_labels, sample_indices in loader:
        batch_logits, _ = classify(model, images, precision=precision)
        logits.append(batch_logits.double().cpu())
        labels.append(label_map[torch.as_tensor(batch_labels).long().cpu()])
        indices.append(torch.as_tensor(sample_indices, dtype=torch.int64).reshape(-1))
    shard = (torch.cat(indices), torch.cat(logits), torch.cat(labels)) if indices else None
    shards = [s for s in gather_object([shard]) if s is not None]
    if not shards:
        raise DataError("no images to calibrate on")
    all_indices, all_logits, all_labels = (torch.cat(parts) for parts in zip(*shards))
    order = all_indices.argsort()  # sample order: the same arrays on every rank whatever the sharding
    all_logits, all_labels = all_logits[order], all_labels[order]
    known = all_labels >= 0
    return all_logits[known], all_labels[known]


def calibrate_on_ranks(accelerator, model, loader, label_map: torch.Tensor, precision: str,
                       keep_share: float = KEEP_KNOWN_SHARE, split: str = "val") -> AgreedCalibration:
    """Every rank fits on the same gathered logits; the main process's fit is the one every rank returns."""

    logits, labels = gathered_logits(accelerator, model, loader, label_map, precision)
    if len(labels) == 0:
        raise DataError(f"no image of split '{split}' is of a brand the model knows: nothing to calibrate on")
    fitted = fit_calibration(logits, labels, keep_share=keep_share, split=split)
    fits = gather_object([(fitted.temperature, fitted.threshold)])
    chosen = [fitted]
    broadcast_object_list(chosen)  # rank 0's, so that the written value is the one every rank holds
    return AgreedCalibration(chosen[0], ranks_agree=len(set(fits)) == 1)


def calibrate_export(accelerator, export_dir: Path, loader, label_map: torch.Tensor, precision: str,
                     keep_share: float = KEEP_KNOWN_SHARE, split: str = "val") -> AgreedCalibration:
    """Load the export on every rank, fit on `loader`'s split, write EXPORT/calibration.json (main process)."""

    accelerator.wait_for_everyone()  # the main process has finished writing the export
    model, export = load_export_model(export_dir)
    model = place_model(model, accelerator.device, export.config.train.channels_last)
    agreed = calibrate_on_ranks(accelerator, model, loader, label_map, precision, keep_share, split)
    if accelerator.is_main_process:
        save_calibration(export_dir, agreed.calibration)
    accelerator.wait_for_everyone()
    return agreed


def calibrate_run(run) -> AgreedCalibration | None:
    """The end of training (every rank): fit best/ on the val split, log the figures; None without val or best/."""

    export_dir = run.run_dir / "best"
    if run.val_loader is None or not export_dir.is_dir():
        return None
    # the val loader hands images over in the training precision's dtype (bf16 images need bf16 autocast on a CPU too)
    precision = run.config.train.precision
    agreed = calibrate_export(run.accelerator, export_dir, run.val_loader, torch.arange(len(run.classes)), precision)
    run.tracker.log(calibration_metrics(agreed), step=run.progress.step)
    run.accelerator.print(f"carbrand: calibrated best/: {describe(agreed.calibration)}")
    return agreed


def calibration_metrics(agreed: AgreedCalibration) -> dict[str, float | bool]:
    c = agreed.calibration
    return {"calibration/temperature": c.temperature, "calibration/fitted": c.fitted, "calibration/threshold": c.threshold,
            "calibration/nll_before": c.nll_before, "calibration/nll_after": c.nll_after,
            "calibration/ece_before": c.ece_before, "calibration/ece_after": c.ece_after,
            "calibration/samples": c.samples, "calibration/ranks_agree": agreed.ranks_agree}


def describe(calibration: Calibration) -> str:
    c = calibration
    if not c.fitted:
        return (f"temperature kept at 1: on {c.samples} {c.split} images every answer is right with a wide margin, so the "
                f"NLL has no minimum to fit (ECE {c.ece_before:.4f}); unknown below {c.threshold:.4f} "
                f"(keeps {c.keep_known_share:.0%} of known-brand {c.split} images)")
    return (f"temperature {c.temperature:.4f} on {c.samples} {c.split} images: NLL {c.nll_before:.4f} -> {c.nll_after:.4f}, "
            f"ECE {c.ece_before:.4f} -> {c.ece_after:.4f}; unknown below {c.threshold:.4f} "
            f"(keeps {c.keep_known_share:.0%} of known-brand {c.split} images)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="an export directory (RUN/best); calibration.json is written into it")
    parser.add_argument("--data", type=Path, required=True, help="a prepared dataset (carbrand prepare --out)")
    parser.add_argument("--split", default="val", help="split to fit on (default: val; never the test split you report on)")
    parser.add_argument("--keep-share", type=float, default=KEEP_KNOWN_SHARE,
                        help=f"share of known-brand photos the 'unknown' threshold keeps (default: {KEEP_KNOWN_SHARE})")
    parser.add_argument("--batch-size", type=int, default=None, help="images per process per batch (default: the export's)")
    parser.add_argument("--loader", choices=("auto", "dali", "torchvision"), default=None, help="image loader (default: the export's)")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.keep_share <= 1:
        raise UsageError(f"--keep-share must be in (0, 1]; got {args.keep_share}")
    export = load_export(args.checkpoint)
    if not (args.data / "manifest.json").is_file():
        raise DataError(f"--data {args.data} is not a prepared dataset (no manifest.json): run carbrand prepare first")
    dataset = load_prepared(args.data)
    samples = dataset.splits.get(args.split, [])
    if not samples:
        raise DataError(f"{args.data}: split '{args.split}' is empty or missing")
    label_map = torch.tensor([export.classes.index(c) if c in export.classes else -1 for c in dataset.classes])
    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("loader", args.loader)) if v is not None}
    data_config = dataclasses.replace(export.config.data, manifest=str(args.data), **overrides)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    precision = inference_precision("auto", export.config.train.precision, device)
    loader = build_eval_loader(data_config, samples, backend=resolve_backend(data_config, device), rank=accelerator.process_index,
                               world_size=accelerator.num_processes, device=device, dtype=input_dtype(precision),
                               channels_last=export.config.train.channels_last)
    try:
        agreed = calibrate_export(accelerator, args.checkpoint, loader, label_map, precision, args.keep_share, args.split)
    finally:
        loader.close()
    accelerator.print(f"carbrand calibrate: {describe(agreed.calibration)}; wrote {args.checkpoint / 'calibration.json'}")
    accelerator.end_training()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command_module("calibrate", sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
