"""`carbrand bench data`: images/s of each loader and pipeline on a prepared dataset.

    carbrand bench data --manifest data/cars5/prepared --workers 2
    carbrand bench data --manifest data/cars5/prepared --photo-size 500x375 --photo-size 1024x768
    carbrand bench data --manifest data/stanford_cars/prepared --batch-size 256 --workers 16   (GPU host)
    carbrand bench data --manifest data/cars5/prepared --epochs 3 --augment trivial   (latency per batch)

Each loader runs exactly as the trainer and evaluator build it (sharding, augmentation,
normalisation, copy to the device, output dtype), warm-up batches excluded, the clock
stopped only after the device finished. The train loader's set-up at epoch boundaries counts,
as it does in training (DALI keeps one pipeline for several epochs and builds the next one
when those are read; see carbrand/data/dali_pipelines.py). With `--epochs N` each train loader
instead reads N whole epochs and every batch is timed: latency p50/p99/max, the slowest first
batch of an epoch, and the pipelines built (carbrand/bench/epoch_latency.py).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from carbrand.bench.epoch_latency import LATENCY_KEYS, MIN_EPOCHS, time_epochs
from carbrand.bench.photo_set import build_photo_set, describe, parse_photo_size
from carbrand.bench.timing import now
from carbrand.config import AUGMENT_POLICIES, PRECISIONS, DataConfig
from carbrand.data.loaders import Backend, build_eval_loader, build_train_loader, dali_available
from carbrand.data.manifest import load_prepared
from carbrand.errors import UsageError
from carbrand.precision import input_dtype, resolve_precision

BACKENDS = {"dali-gpu": Backend("dali", "gpu"), "dali-cpu": Backend("dali", "cpu"), "torchvision": Backend("torchvision", "cpu")}
PIPELINES = ("train", "eval")


def default_backends(device: torch.device) -> list[str]:
    names = ["torchvision"]
    if dali_available():
        names.insert(0, "dali-cpu")
        if device.type == "cuda":
            names.insert(0, "dali-gpu")
    return names


def check_backends(names: list[str], device: torch.device) -> None:
    for name in names:
        if name not in BACKENDS:
            raise UsageError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
        if name.startswith("dali") and not dali_available():
            raise UsageError(f"backend {name} needs DALI: pip install carbrand[dali]")
        if name == "dali-gpu" and device.type != "cuda":
            raise UsageError("backend dali-gpu needs a CUDA GPU; this machine has none")


def _endless_batches(loader, pipeline: str) -> Iterator[torch.Tensor]:
    epoch = 0
    while True:
        if pipeline == "train":
            loader.set_epoch(epoch)
        for batch in loader:
            yield batch[0]
        epoch += 1


def measure(loader, pipeline: str, *, warmup_batches: int, batches: int, device: torch.device) -> dict:
    stream = _endless_batches(loader, pipeline)
    for _ in range(warmup_batches):
        next(stream)
    images, start = 0, now(device)
    for _ in range(batches):
        images += next(stream).shape[0]
    seconds = now(device) - start
    stream.close()
    return {"images": images, "seconds": round(seconds, 4), "images_per_second": round(images / seconds, 1)}


def build_loader(pipeline: str, data: DataConfig, backend: Backend, samples, device: torch.device, dtype: torch.dtype):
    options = dict(backend=backend, rank=0, world_size=1, device=device, dtype=dtype, channels_last=True)
    if pipeline == "train":
        return build_train_loader(data, samples, seed=0, **options)
    return build_eval_loader(data, samples, **options)


def measure_backend(args, backend: str, pipeline: str, manifest: Path, samples, device: torch.device,
                    precision: str) -> dict:
    resolved = BACKENDS[backend]
    data = dataclasses.replace(DataConfig(), manifest=str(manifest), loader=resolved.loader, decode=resolved.decode,
                               batch_size=args.batch_size, workers=args.workers, image_size=args.image_size,
                               prefetch=args.prefetch, hw_decoder_load=args.hw_decoder_load, augment=args.augment)
    loader = build_loader(pipeline, data, resolved, samples, device, input_dtype(precision))
    try:
        if args.epochs:
            return time_epochs(loader, args.epochs, device)
        return measure(loader, pipeline, warmup_batches=args.warmup_batches, batches=args.batches, device=device)
    finally:
        loader.close()


def run_data_benchmark(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    backends = args.backends.split(",") if args.backends else default_backends(device)
    check_backends(backends, device)
    for option in ("workers", "batch_size", "image_size", "prefetch", "batches", "repeats"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be >= 1; got {getattr(args, option)}")
    if args.epochs and args.epochs < MIN_EPOCHS:
        raise UsageError(f"--epochs must be >= {MIN_EPOCHS} (or 0 for images/s over --batches); got {args.epochs}")
    if args.warmup_batches < 0:
        raise UsageError(f"--warmup-batches must be >= 0; got {args.warmup_batches}")
    pipelines = ["train"] if args.epochs else args.pipelines.split(",")  # epoch boundaries are the train loader's
    if any(p not in PIPELINES for p in pipelines):
        raise UsageError(f"--pipelines takes {', '.join(PIPELINES)}; got {args.pipelines!r}")
    precision = resolve_precision(args.precision, device)  # the dtype the trainer's loaders would hand over here
    manifests = [Path(args.manifest)] if not args.photo_sizes or args.include_original else []
    for width, height in args.photo_sizes:
        out = Path(args.work_dir) / f"{Path(args.manifest).resolve().parent.name}-{width}x{height}-x{args.copies}"
        print(f"carbrand bench: building {out} ...", file=sys.stderr)
        manifests.append(build_photo_set(Path(args.manifest), out, (width, height), args.copies))
    results = []
    for manifest in manifests:
        dataset = load_prepared(manifest)
        samples = dataset.split(args.split)
        if not samples:
            raise UsageError(f"{manifest}: split {args.split!r} is empty")
        if len(samples) < args.batch_size:
            raise UsageError(f"{manifest}: split {args.split!r} has {len(samples)} images, fewer than one batch of "
                             f"{args.batch_size}; lower --batch-size or raise --copies")
        for pipeline in pipelines:
            runs: dict[str, list[dict]] = {backend: [] for backend in backends}
            for _ in range(args.repeats):  # interleaved, so a busy moment slows every backend alike
                for backend in backends:
                    runs[backend].append(measure_backend(args, backend, pipeline, manifest, samples, device, precision))
            for backend in backends:
                rates = [run["images_per_second"] for run in runs[backend]]
                row = {"dataset": describe(manifest), "manifest": str(manifest), "pipeline": pipeline,
                       "backend": backend, "workers": args.workers, "batch_size": args.batch_size,
                       "image_size": args.image_size, "dtype": precision, "prefetch": args.prefetch,
                       "augment": args.augment if pipeline == "train" else "none",
                       **({"hw_decoder_load": args.hw_decoder_load} if backend == "dali-gpu" else {}),
                       "images_per_second": round(statistics.median(rates), 1), "images_per_second_runs": rates,
                       "images_per_run": runs[backend][0]["images"],
                       **(latency_fields(runs[backend]) if args.epochs else {})}
                print(f"carbrand bench: {row['dataset']:<45} {pipeline:<5} {backend:<11} "
                      f"{row['images_per_second']:>9.1f} img/s (median of {len(rates)})" + latency_text(row), file=sys.stderr)
                results.append(row)
    return {"benchmark": "data", "device": device_name(device), "results": results, "ratios": ratios(results)}


def latency_fields(runs: list[dict]) -> dict:
    """--epochs: the latency figures of the run with the median images/s."""
    median_run = sorted(runs, key=lambda run: run["images_per_second"])[len(runs) // 2]
    return {key: median_run[key] for key in LATENCY_KEYS}


def latency_text(row: dict) -> str:
    if "latency_ms_p50" not in row:
        return ""
    return (f"; batch latency p50 {row['latency_ms_p50']} ms, p99 {row['latency_ms_p99']} ms, max "
            f"{row['latency_ms_max']} ms over {row['epochs']} epochs; {row['pipelines_built']} pipeline(s) built")


def ratios(results: list[dict]) -> list[dict]:
    """Each DALI backend against torchvision on the same set and pipeline (measured in this run)."""
    by_key = {(r["dataset"], r["pipeline"], r["backend"]): r["images_per_second"] for r in results}
    out = []
    for (dataset, pipeline, backend), rate in by_key.items():
        baseline = by_key.get((dataset, pipeline, "torchvision"))
        if backend != "torchvision" and baseline:
            out.append({"dataset": dataset, "pipeline": pipeline, "backend": backend, "versus": "torchvision",
                        "ratio": round(rate / baseline, 3)})
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)"


def add_arguments(parser) -> None:
    parser.add_argument("--manifest", required=True, help="prepared dataset directory (carbrand prepare --out)")
    parser.add_argument("--split", default="train", help="which split's images to read (default train)")
    parser.add_argument("--backends", default=None,
                        help=f"comma list of {', '.join(BACKENDS)} (default: every one this machine can run)")
    parser.add_argument("--pipelines", default="train,eval", help="train, eval or both (default train,eval)")
    parser.add_argument("--workers", type=int, default=2, help="DALI threads = DataLoader workers (default 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--image-size", type=int, default=224, help="output crop side (default 224)")
    parser.add_argument("--prefetch", type=int, default=2, help="prefetch depth, batches (default 2)")
    parser.add_argument("--hw-decoder-load", type=float, default=DataConfig.hw_decoder_load,
                        help=f"dali-gpu: share of images for the hardware JPEG decoder (default {DataConfig.hw_decoder_load})")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="output dtype as the trainer would ask (default auto: bf16 on a GPU with bf16, "
                             "fp16 on one without, no on a CPU)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per loader (default 20)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measurements per loader, interleaved across loaders; the median is kept (default 1)")
    parser.add_argument("--warmup-batches", type=int, default=3, help="untimed batches first (default 3)")
    parser.add_argument("--photo-size", dest="photo_sizes", type=parse_photo_size, action="append", default=[],
                        metavar="WxH", help="also (or only) measure a copy re-encoded at this size; repeatable")
    parser.add_argument("--include-original", action="store_true",
                        help="with --photo-size: measure the photos as prepared too")
    parser.add_argument("--copies", type=int, default=4, help="re-encoded copies per photo (default 4)")
    parser.add_argument("--work-dir", default="runs/bench", help="where re-encoded sets are kept (default runs/bench)")
    parser.add_argument("--cpu", action="store_true", help="measure on the CPU even when a GPU is there")
    parser.add_argument("--augment", choices=AUGMENT_POLICIES, default="none",
                        help="train loaders: the data.augment policy (default none)")
    parser.add_argument("--epochs", type=int, default=0,
                        help=f"time every batch of N >= {MIN_EPOCHS} whole train epochs: latency p50/p99/max and "
                             "pipelines built, epoch boundaries included (default 0: images/s over --batches)")
