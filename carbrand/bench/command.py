"""Measure carbrand's speed; JSON on stdout (and in --out), a readable line per figure on stderr.

    carbrand bench data --manifest data/cars5/prepared --photo-size 500x375 --photo-size 1024x768
    carbrand bench train --config configs/cars5_cpu.yaml --precisions no,bf16
    carbrand bench train --config configs/stanford_cars.yaml data.batch_size=256 --compile off,on   (GPU host)
    carbrand bench serve --checkpoint demo/run/best --photos ../shared/data/cars5/test       (docs/SERVING.md)
    carbrand bench duplicates --sizes 10000,100000,1000000          # near-duplicate search, 1M hashes
    carbrand bench prepare-rows --rows 1000000                       # prepare's memory at 1M manifest rows
    carbrand bench shards --manifest data/cars5/prepared             # an epoch from files vs shards: img/s, opens
    carbrand bench shard-writing --samples 1000000                   # carbrand shard's speed and memory at 1M samples
    carbrand bench accuracy --config configs/cars5_cpu.yaml --manifest data/cars5/prepared --seeds 0,1,2

docs/BENCHMARKS.md explains the method and holds the figures measured so far.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from carbrand.bench import (
    accuracy_sweep,
    data_throughput,
    duplicate_search,
    prepare_rows,
    serve_load,
    shard_reading,
    shard_writing,
    train_throughput,
)
from carbrand.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    subparsers = parser.add_subparsers(dest="what", required=True, metavar="data|train|serve|duplicates|prepare-rows|accuracy|shards|shard-writing")
    benchmarks = (("data", data_throughput), ("train", train_throughput), ("serve", serve_load),
                  ("duplicates", duplicate_search), ("prepare-rows", prepare_rows),
                  ("accuracy", accuracy_sweep), ("shards", shard_reading), ("shard-writing", shard_writing))
    for name, module in benchmarks:
        sub = subparsers.add_parser(name, help=(module.__doc__ or "").splitlines()[0],
                                    description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.add_argument("--out", default=None, help="also write the JSON report to this file")


def run(args: argparse.Namespace) -> int:
    if args.out and not Path(args.out).parent.is_dir():
        raise UsageError(f"--out {args.out}: folder {Path(args.out).parent} does not exist")
    if args.what == "data":
        report = data_throughput.run_data_benchmark(args)
    elif args.what == "serve":
        report = serve_load.run_serve_benchmark(args)
    elif args.what == "duplicates":
        report = duplicate_search.run_duplicate_benchmark(args)
    elif args.what == "accuracy":
        report = accuracy_sweep.run_accuracy_benchmark(args)
    elif args.what == "shards":
        report = shard_reading.run_shard_reading_benchmark(args)
    elif args.what == "shard-writing":
        report = shard_writing.run_shard_writing_benchmark(args)
    elif args.what == "prepare-rows":
        report = prepare_rows.run_prepare_rows_benchmark(args)
    else:
        report = train_throughput.run_train_benchmark(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        temporary = Path(args.out).with_name(Path(args.out).name + ".tmp")
        temporary.write_text(text + "\n")
        temporary.replace(args.out)
    return 0
