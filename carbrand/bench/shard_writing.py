"""`carbrand bench shard-writing`: `carbrand shard`'s samples/s and peak memory at N simulated samples.

    carbrand bench shard-writing --samples 1000000

Simulated split, real writing: N samples whose images are a few dozen small JPEGs (64x48, about
1-2 KB each) used over and over, written by the very code `carbrand shard` runs (each image read,
its header checked, three tar members, an index per shard, fsync and rename per shard) into a
temporary folder at the chosen shard size. Runs in a fresh process and reports its peak resident
memory (VmHWM): what grows with N is the list of samples, never the images.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

from carbrand.bench.duplicate_search import peak_resident_kb
from carbrand.errors import UsageError

DISTINCT_IMAGES = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=1_000_000, help="simulated samples (default: 1000000)")
    parser.add_argument("--shard-size-mb", type=float, default=256, help="shard size (default: 256)")
    parser.add_argument("--work-dir", default=None, help="folder to write in (default: a temporary folder, removed after)")


def run_shard_writing_benchmark(args: argparse.Namespace) -> dict:
    if args.samples < 1:
        raise UsageError(f"--samples must be >= 1; got {args.samples}")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result = pool.apply(measure, (args.samples, args.shard_size_mb, args.work_dir))
    print(f"{args.samples:,} samples: {result['seconds']:.1f} s ({result['samples_per_second']:.0f}/s, "
          f"{result['megabytes_per_second']:.1f} MB/s) into {result['shards']} shards, peak {result['peak_rss_mb']:.0f} MB",
          file=sys.stderr)
    return {"benchmark": "shard-writing", **result}


def measure(samples: int, shard_size_mb: float, work_dir: str | None) -> dict:
    from PIL import Image

    from carbrand.data.manifest import Sample
    from carbrand.prepare.shard_writer import WriteStats, write_split

    folder = Path(tempfile.mkdtemp(prefix="carbrand-bench-shards-", dir=work_dir))
    try:
        photos = []
        for i in range(DISTINCT_IMAGES):
            buffer = io.BytesIO()
            Image.effect_noise((64, 48), 20 + i).convert("RGB").save(buffer, "JPEG", quality=90)
            photos.append(folder / f"photo{i:02d}.jpg")
            photos[-1].write_bytes(buffer.getvalue())
        baseline_kb = peak_resident_kb()  # the interpreter and its imports (torch among them), before any sample
        started = time.perf_counter()
        split = [Sample(path=photos[i % DISTINCT_IMAGES], label=i % 49, brand=f"brand{i % 49:02d}") for i in range(samples)]
        built = time.perf_counter()
        stats = WriteStats()
        entries = write_split(split, folder / "train", shard_bytes=int(shard_size_mb * 2**20), max_pixels=0,
                              json_text=lambda s: json.dumps({"brand": s.brand, "label": s.label, "path": str(s.path)}),
                              stats=stats)
        seconds = time.perf_counter() - built
        return {
            "samples": samples, "shard_size_mb": shard_size_mb, "shards": len(entries),
            "build_rows_seconds": round(built - started, 2), "seconds": round(seconds, 2),
            "samples_per_second": round(samples / seconds, 1),
            "megabytes_per_second": round(stats.bytes_written / 1e6 / seconds, 1),
            "bytes_written": stats.bytes_written, "peak_rss_mb": round(peak_resident_kb() / 1024, 1),
            "peak_rss_before_samples_mb": round(baseline_kb / 1024, 1),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)
