"""`carbrand shard`: a prepared dataset's splits as WebDataset tar shards, for clusters (docs/CLUSTER.md).

    carbrand shard data/cars5/prepared --out data/cars5/shards                   # ~256 MB shards
    carbrand shard data/sc/prepared --out /lustre/sc_shards --shard-size-mb 512
    carbrand train --config configs/cars5_cpu.yaml data.manifest=data/cars5/shards   # train from the shards

Only what prepare accepted goes in (the split CSVs), with each image's bytes unchanged, so a
model scores the same on the shards as on the files. A killed run is resumed by running the
same command again: complete shards are kept, the rest written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from carbrand.data.manifest import SPLITS, Sample, load_prepared, recorded_max_pixels
from carbrand.data.shard_format import SHARDS_FILE, shards_json
from carbrand.errors import UsageError
from carbrand.filesystem import write_text_atomically
from carbrand.prepare.manifest_writer import write_prepared
from carbrand.prepare.shard_writer import WriteStats, shard_order, write_split

DEFAULT_SHARD_SIZE_MB = 256  # large sequential reads; a few hundred shards per 100 GB (WebDataset's advice: 100 MB-1 GB)


def shard_dataset(prepared: Path, out: Path, *, shard_size_mb: float = DEFAULT_SHARD_SIZE_MB, seed: int = 0,
                  quiet: bool = False) -> WriteStats:
    """Write `prepared`'s splits as shards in `out` (resuming a previous run there), then shards.json."""
    if shard_size_mb <= 0:
        raise UsageError(f"--shard-size-mb must be positive; got {shard_size_mb}")
    dataset = load_prepared(prepared)
    if out.resolve() == dataset.directory.resolve():
        raise UsageError(f"--out {out} is the prepared dataset itself: choose another folder")
    max_pixels = recorded_max_pixels(dataset.directory, dataset.info)
    out.mkdir(parents=True, exist_ok=True)
    (out / SHARDS_FILE).unlink(missing_ok=True)  # the folder is no dataset until every shard is written again
    stats, ordered, entries = WriteStats(), {}, {}
    car_models = dataset.car_models

    def json_text(sample: Sample) -> str:
        record = {"brand": sample.brand, "label": sample.label, "path": str(sample.path)}
        if sample.car_model is not None:
            record["car_model"] = car_models[sample.car_model].name
        return json.dumps(record, ensure_ascii=False)

    for name in SPLITS:
        samples = dataset.splits.get(name, [])
        if not samples:
            shutil.rmtree(out / name, ignore_errors=True)  # a previous run's shards of a split that is now empty
            continue
        ordered[name] = [samples[i] for i in shard_order(len(samples), seed)]
        entries[name] = write_split(ordered[name], out / name, shard_bytes=int(shard_size_mb * 2**20), max_pixels=max_pixels,
                                    json_text=json_text, stats=stats)
        if not quiet:
            print(f"carbrand shard: {name}: {len(samples)} samples in {len(entries[name])} shard(s)", file=sys.stderr)
    info = {key: value for key, value in dataset.info.items() if key not in ("format_version", "root")}
    write_prepared(out, dataset.root, dataset.classes, ordered, {**info, "sharded_from": str(dataset.directory.resolve())}, car_models)
    write_text_atomically(out / SHARDS_FILE, shards_json({"source": str(dataset.directory.resolve()), "seed": seed,
                                                          "shard_size_mb": shard_size_mb}, entries))
    return stats


def summary(out: Path, entries_count: int, stats: WriteStats) -> str:
    rate = stats.samples_written / stats.seconds if stats.seconds else 0.0
    return (f"carbrand shard: {out / SHARDS_FILE}: {entries_count} shard(s); wrote {stats.samples_written} samples "
            f"({stats.bytes_written / 2**20:.1f} MiB, {rate:.0f} samples/s), kept {stats.samples_kept} from a previous run")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prepared", metavar="PREPARED", type=Path, help="a prepared dataset (the folder `carbrand prepare --out` wrote)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the shards, their indexes and shards.json")
    parser.add_argument("--shard-size-mb", type=float, default=DEFAULT_SHARD_SIZE_MB,
                        help=f"close a shard before it passes this size (default: {DEFAULT_SHARD_SIZE_MB})")
    parser.add_argument("--seed", type=int, default=0, help="the order samples are written in (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary line")


def run(args: argparse.Namespace) -> int:
    stats = shard_dataset(args.prepared, args.out, shard_size_mb=args.shard_size_mb, seed=args.seed, quiet=args.quiet)
    shards = json.loads((args.out / SHARDS_FILE).read_text())["splits"]
    print(summary(args.out, sum(len(v) for v in shards.values()), stats))
    return 0

