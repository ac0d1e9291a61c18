"""`carbrand bench shards`: training epochs read from files and from shards, per loader: images/s and file opens.

    carbrand bench shards --manifest data/cars5/prepared --workers 2
    carbrand bench shards --manifest data/cars5/prepared --photo-size 1024x768 --copies 4

The prepared dataset is sharded into --work-dir (kept between runs), then each (source, loader)
reads --epochs whole train epochs in a process of its own, as the trainer builds the loader (one rank),
twice: once for images/s, once under `strace -f -e trace=open,openat` to count the files it opens
under the images' folder or the shards' (set-up and the epoch apart: the child opens a marker
path between them). A shared file system's metadata latency is not simulated: the report adds
opens x 1 ms and opens x 5 ms to the epoch's time, the seconds a loader would wait for opens one
after another (several reading threads overlap them, at best dividing that by their number).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from carbrand.bench.photo_set import build_photo_set, parse_photo_size
from carbrand.errors import UsageError

BACKENDS = ("torchvision", "dali-cpu")
MARKER = "/carbrand-bench-epoch-starts"  # opened (and missing) between set-up and the epoch: strace shows it
OPEN_LATENCIES_MS = (1, 5)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="prepared dataset directory (carbrand prepare --out)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {', '.join(BACKENDS)}")
    parser.add_argument("--workers", type=int, default=2, help="DALI threads = DataLoader workers (default 2)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--image-size", type=int, default=224, help="output crop side (default 224)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs read per measurement; the median epoch is kept (default 3)")
    parser.add_argument("--shard-size-mb", type=float, default=256, help="shard size for the sharded copy (default 256)")
    parser.add_argument("--photo-size", dest="photo_size", type=parse_photo_size, default=None, metavar="WxH",
                        help="measure a copy re-encoded at this size instead of the photos as prepared")
    parser.add_argument("--copies", type=int, default=4, help="with --photo-size: re-encoded copies per photo (default 4)")
    parser.add_argument("--work-dir", default="runs/bench", help="where the sharded (and re-encoded) sets are kept")


def run_shard_reading_benchmark(args: argparse.Namespace) -> dict:
    from carbrand.prepare.shard_command import (
        shard_dataset,  # the bench's own set-up, not what it measures
    )

    backends = args.backends.split(",")
    if any(b not in BACKENDS for b in backends):
        raise UsageError(f"--backends takes {', '.join(BACKENDS)}; got {args.backends!r}")
    if shutil.which("strace") is None:
        raise UsageError("bench shards counts file opens with strace, which is not installed here")
    manifest = Path(args.manifest)
    if args.photo_size:
        manifest = build_photo_set(manifest, Path(args.work_dir) / f"{manifest.resolve().name}-{args.photo_size[0]}x"
                                   f"{args.photo_size[1]}-x{args.copies}", args.photo_size, args.copies)
    shards = Path(args.work_dir) / f"{manifest.resolve().name}-shards-{args.shard_size_mb:g}mb"
    stats = shard_dataset(manifest, shards, shard_size_mb=args.shard_size_mb, quiet=True)
    results = []
    for source, path in (("files", manifest), ("shards", shards)):
        for backend in backends:
            options = ["--source", str(path), "--backend", backend, "--workers", str(args.workers),
                       "--batch-size", str(args.batch_size), "--image-size", str(args.image_size), "--epochs", str(args.epochs)]
            timed = _child(options)
            opens = _count_opens(options, [_image_folder(manifest), shards.resolve()] if source == "files" else [shards.resolve()],
                                 args.epochs)
            row = {"source": source, "backend": backend, **timed, **opens,
                   **{f"seconds_per_epoch_at_{ms}ms_per_open": round(timed["seconds"] + opens["opens_per_epoch"] * ms / 1000, 2)
                      for ms in OPEN_LATENCIES_MS}}
            print(f"carbrand bench: {source:<6} {backend:<11} {row['images_per_second']:>7.1f} img/s; opens: "
                  f"{row['opens_set_up']} at set-up, {row['opens_per_epoch']} per epoch of {row['images']} images", file=sys.stderr)
            results.append(row)
    return {"benchmark": "shards", "manifest": str(manifest), "shards": str(shards), "workers": args.workers,
            "batch_size": args.batch_size, "image_size": args.image_size, "shard_size_mb": args.shard_size_mb,
            "shard_write": dataclasses.asdict(stats), "results": results}


def _image_folder(manifest: Path) -> Path:
    from carbrand.data.manifest import load_prepared

    return load_prepared(manifest).root.resolve()


def _child(options: list[str], prefix: list[str] | None = None) -> dict:
    command = [*(prefix or []), sys.executable, "-m", "carbrand.bench.shard_reading", *options]
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"bench child failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _count_opens(options: list[str], folders: list[Path], epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        trace = Path(scratch) / "trace"
        # --seccomp-bpf: only open calls stop the process, so the trace barely slows it
        _child(options, ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=open,openat", "-o", str(trace)])
        lines = trace.read_text(errors="replace").splitlines()
    marker = next(i for i, line in enumerate(lines) if MARKER in line)
    prefixes = tuple(f'"{folder}/' for folder in folders)

    def count(part: list[str]) -> int:
        return sum(1 for line in part if any(p in line for p in prefixes))

    return {"opens_set_up": count(lines[:marker]), "opens_per_epoch": round(count(lines[marker:]) / epochs, 1)}


def read_epochs(source: Path, backend: str, workers: int, batch_size: int, image_size: int, epochs: int) -> dict:
    """Build the train loader as the trainer does (rank 0 of 1), then read `epochs` epochs: the median epoch's figures."""
    import torch

    from carbrand.config import DataConfig
    from carbrand.data.loaders import Backend, build_train_loader
    from carbrand.data.manifest import load_prepared

    resolved = Backend("dali", "cpu") if backend == "dali-cpu" else Backend("torchvision", "cpu")
    data = DataConfig(manifest=str(source), loader=resolved.loader, decode="cpu", batch_size=batch_size, workers=workers,
                      image_size=image_size)
    samples = load_prepared(source).split("train")
    loader = build_train_loader(data, samples, backend=resolved, rank=0, world_size=1, seed=0, device=torch.device("cpu"),
                                dtype=torch.float32, channels_last=True)
    try:
        open(MARKER).close()
    except OSError:
        pass
    times, images = [], 0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        start, images = time.perf_counter(), 0
        for batch, _ in loader:
            images += batch.shape[0]
        times.append(time.perf_counter() - start)
    loader.close()
    seconds = statistics.median(times)  # a busy moment on a shared machine slows one epoch, not the median
    return {"images": images, "epochs": epochs, "seconds": round(seconds, 3), "images_per_second": round(images / seconds, 1)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for name in ("--source", "--backend"):
        parser.add_argument(name, required=True)
    for name in ("--workers", "--batch-size", "--image-size", "--epochs"):
        parser.add_argument(name, type=int, required=True)
    child = parser.parse_args()
    print(json.dumps(read_epochs(Path(child.source), child.backend, child.workers, child.batch_size, child.image_size, child.epochs)))
