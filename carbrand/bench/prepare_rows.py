"""`carbrand bench prepare-rows`: peak memory and time of prepare's bookkeeping at N manifest rows.

    carbrand bench prepare-rows --rows 1000000

Simulated rows, no image files: N source items with the records verification returns
(sha1, pHash, size; 1 % planted near duplicates), then what `carbrand prepare` does after
verifying: the duplicate groups, the split, the samples, and the CSVs and manifest written to
a temporary folder. Runs in a fresh process; reports its peak resident memory (VmHWM).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

from carbrand.bench.duplicate_search import peak_resident_kb, planted_hashes
from carbrand.errors import UsageError
from carbrand.prepare.command import _samples
from carbrand.prepare.duplicates import duplicate_groups
from carbrand.prepare.formats import SourceItem
from carbrand.prepare.manifest_writer import write_prepared
from carbrand.prepare.splits import assign_splits
from carbrand.prepare.verify import ImageCheck, VerifyTask

BRANDS = 49


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=1_000_000, help="simulated images (default: 1000000)")


def run_prepare_rows_benchmark(args: argparse.Namespace) -> dict:
    if args.rows < 2 * BRANDS:
        raise UsageError(f"--rows {args.rows} must be at least {2 * BRANDS}")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result = pool.apply(measure, (args.rows,))
    print(f"{args.rows:,} rows: {result['seconds']:.1f} s, peak {result['peak_rss_mb']:.0f} MB", file=sys.stderr)
    return {"benchmark": "prepare-rows", **result}


def measure(rows: int) -> dict:
    started = time.perf_counter()
    root = Path("/data/photos")
    hashes, _ = planted_hashes(rows, 4, 0.0, seed=0)
    items = [SourceItem(path=root / f"brand{i % BRANDS:02d}" / f"{i:08d}.jpg", brand=f"brand{i % BRANDS:02d}") for i in range(rows)]
    tasks = [VerifyTask(path=item.path) for item in items]
    checks = [ImageCheck(path=item.path, accepted=True, width=500, height=375, sha1=f"{i:040x}", phash=int(h))
              for i, (item, h) in enumerate(zip(items, hashes.tolist()))]
    built = time.perf_counter()
    groups = duplicate_groups([c.sha1 for c in checks], [c.phash for c in checks], 4)
    plan = assign_splits([item.brand for item in items], [None] * rows, groups, 0.1, 0.1, 0, False)
    classes = sorted({item.brand for item in items})
    splits = _samples(items, tasks, list(range(rows)), plan, classes, False)
    with tempfile.TemporaryDirectory() as out:
        write_prepared(Path(out), root, classes, splits, {"duplicates": [[str(i) for i in g] for g in groups]})
        csv_megabytes = sum(path.stat().st_size for path in Path(out).glob("*.csv")) / 1e6
    return {
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 2),
        "build_rows_seconds": round(built - started, 2),
        "after_verification_seconds": round(time.perf_counter() - built, 2),
        "duplicate_groups": len(groups),
        "csv_megabytes": round(csv_megabytes, 1),
        "peak_rss_mb": round(peak_resident_kb() / 1024, 1),
    }
