"""Evaluate an exported brand classifier on a prepared dataset split (or a raw image folder).

    accelerate launch carbrand/evaluate.py --checkpoint runs/cars/best --data prepared/cars --split test
    accelerate launch --multi_gpu --num_processes 8 carbrand/evaluate.py --checkpoint runs/cars/best --data prepared/cars
    torchrun --nproc-per-node 8 carbrand/evaluate.py --checkpoint runs/cars/best --data prepared/cars
    python -m carbrand.evaluate --checkpoint runs/cars/best --data photos/   # raw root/<brand>/*.jpg: all of it is the split
    carbrand evaluate --checkpoint runs/cars/best --data prepared/cars --split val --tta-flip

The main process opens the data (a raw folder is verified there, once) and sends the list of
images to the others. Each process predicts its shard (samples rank, rank + world_size, ...); the main process
gathers one small record per image, checks that every image was counted exactly once,
and writes OUT (default: next to the checkpoint, RUN/eval_<split> for RUN/best and
RUN/.../eval_<name>_<split> for any other export): metrics.json, per_class.csv,
confusion_matrix.png, misclassified.csv, predictions.csv, reliability.png and report.html
(see evaluation/report.py).

Confidence: when the export holds calibration.json (`carbrand calibrate`, or the end of
training), probabilities are also scored after temperature scaling (ECE and NLL before and
after, reliability.png), and a photo whose calibrated top-1 probability is below
--min-confidence (default: the stored threshold) counts as answered "unknown"
(rejected_share, accepted_accuracy). report.html's gallery shows each brand's worst
mistakes with the Grad-CAM overlay of the brand answered (--gallery N per brand).

Brands are matched by name between the dataset's classes.json and the export's. A split
holding only some of the model's brands is fine; a brand the model does not know is an
error, or with `--unknown-brands report` its images are reported apart (how many, what
the model called them) and left out of the metrics; metrics.json's `open_set` then says how
well the calibrated top-1 probability tells them from known brands (AUROC) and what share of
them the threshold answers "unknown".
"""

from __future__ import annotations

from carbrand.command_line import rerun_as_module, run_command_module

if __name__ == "__main__" and not __package__:  # the file, given to accelerate launch or torchrun
    rerun_as_module("carbrand.evaluate")  # before any other import: see rerun_as_module

import argparse  # noqa: E402 - after the re-run above, as are the imports below
import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from carbrand.checkpoint import Export, load_export_model
from carbrand.config import Config
from carbrand.data.images import pixel_limit
from carbrand.data.loaders import build_eval_loader, resolve_backend
from carbrand.data.manifest import SPLITS, Sample, load_prepared, recorded_max_pixels
from carbrand.errors import CarbrandError, DataError, UsageError, first_line
from carbrand.evaluation import calibration_report, report
from carbrand.evaluation.html_report import Explainer, build_gallery
from carbrand.evaluation.report import SampleRecord, check_output_directory, default_out_dir
from carbrand.inference.calibration import calibrated_probabilities, load_calibration, resolve_min_confidence
from carbrand.inference.classifier import (PRECISIONS, add_crops_argument, inference_precision, place_model, predict_batches,
                                           with_eval_crops)
from carbrand.inference.gradcam import explain
from carbrand.precision import input_dtype
from carbrand.prepare.command import prepare_dataset
from carbrand.tracking import Tracker

UNKNOWN_BRAND_MODES = ("error", "report")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="an export directory (RUN/best): model.safetensors, classes.json, config.yaml")
    parser.add_argument("--data", type=Path, required=True,
                        help="prepared dataset (carbrand prepare --out) or a raw image-folder tree, verified on the fly with prepare's rules")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test; a flat raw folder is all of it)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory, replaced as a whole (default: RUN/eval_<split> for RUN/best, else <checkpoint>/../eval_<name>_<split>)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per process per batch (default: the export's data.batch_size)")
    parser.add_argument("--workers", type=int, default=None, help="loader threads/processes (default: the export's data.workers)")
    parser.add_argument("--loader", choices=("auto", "dali", "torchvision"), default=None, help="image loader (default: the export's data.loader)")
    parser.add_argument("--decode", choices=("auto", "gpu", "cpu"), default=None, help="DALI decode device (default: the export's data.decode)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="autocast dtype (default: auto = the training precision on a GPU, fp32 on the CPU)")
    parser.add_argument("--topk", type=int, default=5, help="k of top-k accuracy (default: 5, capped at the number of brands)")
    parser.add_argument("--tta-flip", action="store_true", help="average the softmax of each image and its mirror image")
    add_crops_argument(parser)
    parser.add_argument("--unknown-brands", choices=UNKNOWN_BRAND_MODES, default="error",
                        help="a split brand the model does not know: error (default) or report its images apart, outside the metrics")
    parser.add_argument("--min-confidence", default=None, metavar="auto|P",
                        help="count an answer below this calibrated top-1 probability as 'unknown' "
                             "(default: the threshold in the export's calibration.json, if any)")
    parser.add_argument("--gallery", type=int, default=3, metavar="N",
                        help="report.html: the N most confident mistakes of each brand, with Grad-CAM overlays (default: 3; 0: none)")
    parser.add_argument("--wandb-mode", choices=("online", "offline", "disabled"), default=None,
                        help="W&B mode (default: the export's wandb.mode; WANDB_MODE overrides)")


def check_arguments(args: argparse.Namespace) -> None:
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer; got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be >= 0; got {args.workers}")
    if args.topk < 1:
        raise UsageError(f"--topk must be at least 1; got {args.topk}")
    if args.gallery < 0:
        raise UsageError(f"--gallery must be >= 0; got {args.gallery}")
    if not args.data.exists():
        raise DataError(f"data not found: {args.data}")
    if not args.data.is_dir():
        raise DataError(f"--data {args.data} is not a directory (a prepared dataset or an image-folder tree)")


@dataclass(frozen=True)
class OpenedSplit:
    classes: list[str]  # the data's brands
    samples: list[Sample]
    kind: str  # "prepared" or "raw flat|split image folder"
    max_pixels: int  # the pixel limit the images were verified under: the loader applies the same


def open_split(data: Path, split: str, workers: int | None, scratch: Path, max_pixels: int) -> OpenedSplit:
    """`split`'s images: from a prepared dataset (under its own pixel limit), or a raw tree prepared into `scratch`
    (under `max_pixels`, the export's).

    A raw flat tree (root/<brand>/*) is verified with prepare's rules and all of it is the
    split; a raw split tree (root/test/<brand>/*) gives its own `split` folder.
    """
    if (data / "manifest.json").is_file():
        dataset = load_prepared(data)
        if split not in SPLITS:
            raise DataError(f"no split '{split}' (splits: {', '.join(SPLITS)})")
        samples = dataset.split(split)
        if not samples:
            raise DataError(f"{data}: split '{split}' is empty (have: {', '.join(n for n, s in dataset.splits.items() if s) or 'none'})")
        return OpenedSplit(dataset.classes, samples, "prepared", recorded_max_pixels(data, dataset.info))
    # No val carved out, no leaked copy dropped, no near-duplicate search: every accepted image is evaluated.
    summary = prepare_dataset(data, scratch, quiet=True, val_frac=0.0, test_frac=0.0, keep_leaked=True,
                              near_duplicate_distance=-1, workers=workers or None, max_pixels=pixel_limit(max_pixels))
    dataset = load_prepared(scratch)
    rejected = len(summary.rejected)
    if rejected:
        print(f"carbrand evaluate: warning: {rejected} file(s) under {data} rejected, e.g. "
              f"{summary.rejected[0]['path']}: {summary.rejected[0]['reason']}", file=sys.stderr)
    if summary.manifest.get("layout") == "flat":
        samples = [s for name in SPLITS for s in dataset.splits.get(name, [])]
    else:
        if split not in SPLITS:
            raise DataError(f"no split '{split}' (splits: {', '.join(SPLITS)})")
        samples = dataset.splits.get(split, [])
        if not samples:
            raise DataError(f"{data}: the image-folder tree has no '{split}' images (folders: {', '.join(n for n, s in dataset.splits.items() if s)})")
    return OpenedSplit(dataset.classes, samples, f"raw {summary.manifest.get('layout')} image folder", pixel_limit(max_pixels))


def match_brands(data_classes: list[str], model_classes: list[str], samples, mode: str) -> list[int]:
    """Model label of each sample, by brand name; -1 for a brand the model does not know (report mode)."""
    model_label = {name: index for index, name in enumerate(model_classes)}
    unknown = sorted({s.brand for s in samples} - set(model_label))
    if unknown and mode == "error":
        raise DataError(
            f"brand(s) {', '.join(repr(b) for b in unknown)} in the data are unknown to the model "
            f"(it knows {len(model_classes)}: {', '.join(model_classes[:10])}{', ...' if len(model_classes) > 10 else ''}); "
            f"use --unknown-brands report to evaluate the rest and report these apart"
        )
    return [model_label.get(s.brand, -1) for s in samples]


@dataclasses.dataclass(frozen=True)
class Confidence:
    """What the export's calibration.json says (temperature 1 and no threshold without one)."""

    temperature: float
    threshold: float | None  # calibrated top-1 probability below which the answer is "unknown"
    calibrated: bool


@dataclasses.dataclass(frozen=True)
class Setup:
    """How the split was evaluated: heads metrics.json."""

    data_kind: str  # "prepared", or the kind of raw image folder
    split: str
    split_samples: int
    world_size: int
    loader: str
    decode: str
    precision: str
    tta_flip: bool
    eval_crops: int  # crops along each photo's longer side, probabilities averaged
    batch_size: int
    arch: str
    image_size: int


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Everything the main process reports on: the model, the split, every rank's records, and how."""

    export: Export
    data: Path
    samples: list[Sample]
    targets: list[int]  # model label of each sample's brand, -1 for a brand the model does not know
    records: list[SampleRecord]  # gathered from every rank, one per image
    top_k: int
    setup: Setup
    confidence: Confidence
    started: float  # time.perf_counter() at the start of the command


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    """Where and how the results go."""

    out: Path
    gallery: int  # report.html: the most confident mistakes shown per brand
    explain: Explainer | None  # Grad-CAM of a photo for the gallery (None without one)
    wandb_mode: str | None
    max_pixels: int = 0  # the gallery's photos are read under the loader's pixel limit


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    check_arguments(args)
    model, export = load_export_model(args.checkpoint)
    confidence = read_confidence(args.checkpoint, args.min_confidence)
    out = (args.out or default_out_dir(args.checkpoint, args.split)).resolve()
    if out == export.directory.resolve():
        raise UsageError(f"--out {out} is the checkpoint itself: choose another directory")
    check_output_directory(out)  # before any work: OUT is replaced as a whole at the end

    # cpu=True is what makes Accelerate form a gloo group under torchrun on a machine without GPUs
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    loader = tracker = None
    try:
        opened = open_split_on_main(accelerator, args.data, args.split, args.workers, export.config.data.max_pixels)
        samples = opened.samples
        targets = match_brands(opened.classes, export.classes, samples, args.unknown_brands)
        if all(target < 0 for target in targets):
            raise DataError(f"none of the {len(samples)} images in split '{args.split}' is of a brand the model knows")
        top_k = min(args.topk, len(export.classes))

        overrides = {key: value for key, value in (("batch_size", args.batch_size), ("workers", args.workers),
                                                    ("loader", args.loader), ("decode", args.decode)) if value is not None}
        config = export.config if args.crops is None else with_eval_crops(export.config, args.crops)
        data_config = dataclasses.replace(config.data, manifest=str(args.data), max_pixels=opened.max_pixels, **overrides)
        device = accelerator.device
        backend = resolve_backend(data_config, device)  # once: one notice, one answer
        precision = inference_precision(args.precision, export.config.train.precision, device)
        channels_last = export.config.train.channels_last
        model = place_model(model, device, channels_last)
        loader = build_eval_loader(data_config, samples, backend=backend, rank=accelerator.process_index,
                                   world_size=accelerator.num_processes,
                                   device=device, dtype=input_dtype(precision), channels_last=channels_last)
        predictions = predict_batches(model, loader, num_classes=len(export.classes), precision=precision, tta_flip=args.tta_flip)
        assert len(predictions) == loader.num_samples, f"rank {accelerator.process_index} predicted {len(predictions)} of {loader.num_samples} samples"

        records = shard_records(predictions, targets, top_k, confidence.temperature)
        gathered = gather_object(records)  # every rank's records, in rank order, on every rank
        if accelerator.is_main_process:
            setup = Setup(data_kind=opened.kind, split=args.split, split_samples=len(samples),
                          world_size=accelerator.num_processes, loader=backend.loader, decode=backend.decode,
                          precision=precision, tta_flip=args.tta_flip, eval_crops=data_config.eval_crops,
                          batch_size=data_config.batch_size,
                          arch=export.config.model.arch, image_size=data_config.eval_size)
            evaluation = Evaluation(export=export, data=args.data, samples=samples, targets=targets, records=gathered,
                                    top_k=top_k, setup=setup, confidence=confidence, started=started)
            options = ReportOptions(out=out, gallery=args.gallery, wandb_mode=args.wandb_mode, max_pixels=data_config.max_pixels,
                                    explain=gallery_explainer(model, export.config) if args.gallery else None)
            tracker = report_results(evaluation, options)
        accelerator.wait_for_everyone()
        accelerator.end_training()  # destroys the process group
    finally:
        if loader is not None:
            loader.close()
        if tracker is not None:
            tracker.finish()
    return 0


def open_split_on_main(accelerator, data: Path, split: str, workers: int | None, max_pixels: int) -> OpenedSplit:
    """open_split on the main process only; the others receive its OpenedSplit, or its error.

    A raw folder is verified once, not once per process, and no process needs the main process's
    scratch folder (possibly on another node's /tmp): the samples name the images under `data`,
    which every process reads.
    """
    outcome = [None]
    if accelerator.is_main_process:
        scratch = Path(tempfile.mkdtemp(prefix="carbrand-eval-data-"))
        try:
            outcome[0] = open_split(data, split, workers, scratch, max_pixels)
        except Exception as error:
            # The others wait in the broadcast: tell them, so that every process stops with the same line.
            failure = error if isinstance(error, CarbrandError) else CarbrandError(
                f"the main process could not open {data} ({type(error).__name__}: {first_line(error)})")
            broadcast_object_list([failure])
            raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    broadcast_object_list(outcome)
    if isinstance(outcome[0], CarbrandError):
        raise outcome[0]
    return outcome[0]


def read_confidence(checkpoint: Path, min_confidence: str | None) -> Confidence:
    calibration = load_calibration(checkpoint)
    if min_confidence is None:
        threshold = calibration.threshold if calibration is not None else None
    else:
        threshold = resolve_min_confidence(min_confidence, calibration, checkpoint)
    return Confidence(temperature=calibration.temperature if calibration else 1.0, threshold=threshold,
                      calibrated=calibration is not None)


def gallery_explainer(model, config: Config) -> Explainer:
    """Grad-CAM in the eval geometry with the evaluated model, wherever it is placed."""
    return lambda photo, label: explain(model, photo, config.data, label=label, channels_last=config.train.channels_last)


def report_results(evaluation: Evaluation, options: ReportOptions) -> Tracker | None:
    """Main process: check every image was counted once, compute the metrics, write OUT, log to W&B.

    Returns the W&B tracker (to finish), or None.
    """
    samples, classes = evaluation.samples, evaluation.export.classes
    indices = sorted(r.index for r in evaluation.records)
    assert indices == list(range(len(samples))), (
        f"gathered {len(indices)} records for {len(samples)} samples: some image was dropped or counted twice")
    threshold = evaluation.confidence.threshold
    scored = [report.ScoredSample(path=str(samples[r.index].path), true_brand=samples[r.index].brand,
                                  target=evaluation.targets[r.index], record=r,
                                  rejected=threshold is not None and r.calibrated_confidence < threshold,
                                  member=samples[r.index].member)
              for r in evaluation.records]
    metrics = confidence_metrics(evaluation, scored)
    gallery = build_gallery(report.mistakes(scored), classes, options.gallery, options.explain, options.max_pixels) if options.gallery else []
    metrics["seconds"] = round(time.perf_counter() - evaluation.started, 3)
    report.write_outputs(options.out, metrics, scored, classes, gallery)
    print(report.format_summary(metrics))
    print(f"wrote {options.out}")
    tracker = None
    try:  # the results are on disk already: W&B trouble is a warning, never a failed evaluation
        tracker = start_tracker(options.out, evaluation.export.config, options.wandb_mode)
        if tracker is not None:
            report.log_to_wandb(tracker, metrics, options.out, scored, classes, gallery)
    except Exception as error:
        print(f"carbrand evaluate: warning: W&B logging failed ({type(error).__name__}: {error}); "
              f"the results are in {options.out}", file=sys.stderr)
    return tracker


def confidence_metrics(evaluation: Evaluation, scored: list[report.ScoredSample]) -> dict:
    """metrics.json: the evaluator's metrics, then calibration before/after, "unknown" answers and the open set."""
    export, confidence = evaluation.export, evaluation.confidence
    known = [s for s in scored if s.target >= 0]
    metrics, _ = report.build_metrics(scored, export.classes, evaluation.top_k)
    metrics = {
        "checkpoint": str(export.directory.resolve()),
        "data": str(evaluation.data.resolve()),
        **dataclasses.asdict(evaluation.setup),
        **metrics,
        **calibration_report.calibration_metrics(known, confidence.temperature, confidence.calibrated),
        **calibration_report.rejection_metrics(known, confidence.threshold),
        "unknown_brands": report.unknown_brand_report(scored, export.classes),
    }
    open_set = calibration_report.open_set_metrics(scored, confidence.threshold)
    if open_set is not None:
        metrics["open_set"] = open_set
    return metrics


def shard_records(predictions, targets: list[int], top_k: int, temperature: float = 1.0) -> list[SampleRecord]:
    """One picklable record per image of this rank's shard (a few numbers, never the full probability vector)."""
    top = predictions.probabilities.topk(top_k, dim=1)
    confidence, predicted = top.values[:, 0], top.indices[:, 0]
    calibrated = calibrated_probabilities(predictions.logits, temperature)
    records = []
    for row, index in enumerate(predictions.indices.tolist()):
        target = targets[index]
        true_probability = float(predictions.probabilities[row, target]) if target >= 0 else math.nan
        records.append(SampleRecord(index=index, predicted=int(predicted[row]), confidence=float(confidence[row]),
                                    true_probability=true_probability, topk=tuple(top.indices[row].tolist()),
                                    topk_probabilities=tuple(top.values[row].tolist()),
                                    calibrated_confidence=float(calibrated[row, int(predicted[row])]),
                                    calibrated_true_probability=float(calibrated[row, target]) if target >= 0 else math.nan))
    return records


def start_tracker(out: Path, config: Config, wandb_mode: str | None) -> Tracker | None:
    """A W&B run of job_type evaluate in OUT, unless the effective mode is disabled."""
    config = dataclasses.replace(config, wandb=dataclasses.replace(config.wandb, mode=wandb_mode or config.wandb.mode))
    if os.environ.get("WANDB_MODE", config.wandb.mode) == "disabled":
        return None
    return Tracker(out, config, is_main=True, job_type="evaluate", metrics_file="eval_metrics.jsonl")


def main(argv: list[str] | None = None) -> int:
    return run_command_module("evaluate", sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
