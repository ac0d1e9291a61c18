"""`carbrand` console script: one sub-command per job, each owned by its own module.

    carbrand prepare SOURCE --out DIR        carbrand.prepare.command
    carbrand shard PREPARED --out DIR        carbrand.prepare.shard_command
    carbrand train --config FILE [k=v ...]   carbrand.train
    carbrand evaluate --checkpoint DIR ...   carbrand.evaluate
    carbrand predict --checkpoint DIR PATH   carbrand.inference.predict
    carbrand export --checkpoint DIR ...     carbrand.inference.export
    carbrand serve --checkpoint DIR          carbrand.serve.command
    carbrand calibrate --checkpoint DIR ...  carbrand.evaluation.calibrate
    carbrand explain --checkpoint DIR PHOTO  carbrand.inference.explain
    carbrand demo                            carbrand.demo.command
    carbrand bench data|train ...            carbrand.bench.command

Each module exposes `add_arguments(parser)` and `run(args) -> int`; carbrand.command_line runs
it: a `CarbrandError` raised anywhere becomes one line on stderr and its exit code (2 for usage
errors). Only the chosen command's module is imported: `carbrand predict` need not load the trainer.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from carbrand.command_line import run_command_module

COMMANDS = {
    "prepare": ("carbrand.prepare.command", "verify images and write a prepared dataset (manifest)"),
    "shard": ("carbrand.prepare.shard_command", "write a prepared dataset as WebDataset tar shards (clusters: docs/CLUSTER.md)"),
    "train": ("carbrand.train", "train a brand classifier (use `accelerate launch` for several processes)"),
    "evaluate": ("carbrand.evaluate", "test-set metrics of an exported model"),
    "predict": ("carbrand.inference.predict", "which brand is this? top-k brands for image files or folders"),
    "export": ("carbrand.inference.export", "write the model as ONNX or TorchScript with its input contract"),
    "serve": ("carbrand.serve.command", "an HTTP service and web page that answer which brand a photo shows"),
    "calibrate": ("carbrand.evaluation.calibrate", "fit the temperature and the 'unknown' threshold of an export (calibration.json)"),
    "explain": ("carbrand.inference.explain", "Grad-CAM overlays: where in each photo the model saw its brand"),
    "bench": ("carbrand.bench.command", "measure loader and training throughput (images/s, JSON)"),
    "demo": ("carbrand.demo.command", "generate a demo dataset, then prepare, train, evaluate and predict on it"),
}


def top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carbrand", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        top_level_parser().parse_args(argv)  # prints usage or help and exits
    return run_command(argv[0], argv[1:])


def run_command(name: str, argv: list[str] | None = None) -> int:
    """Import the named command's module, then parse its arguments and run it."""
    return run_command_module(name, importlib.import_module(COMMANDS[name][0]), argv)


if __name__ == "__main__":
    sys.exit(main())
