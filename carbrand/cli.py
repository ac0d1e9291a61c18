"""`carbrand` console script: one sub-command per job, each owned by its own module.

    carbrand prepare SOURCE --out DIR        carbrand.prepare.command
    carbrand train --config FILE [k=v ...]   carbrand.train
    carbrand evaluate --checkpoint DIR ...   carbrand.evaluate
    carbrand predict --checkpoint DIR PATH   carbrand.predict
    carbrand export --checkpoint DIR ...     carbrand.export
    carbrand serve --checkpoint DIR          carbrand.serve.command
    carbrand demo                            carbrand.demo.command
    carbrand bench data|train ...            carbrand.bench.command

Each module exposes `add_arguments(parser)` and `run(args) -> int`. A `CarbrandError`
raised anywhere becomes one line on stderr and its exit code (2 for usage errors).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from carbrand.errors import CarbrandError

COMMANDS = {
    "prepare": ("carbrand.prepare.command", "verify images and write a prepared dataset (manifest)"),
    "train": ("carbrand.train", "train a brand classifier (use `accelerate launch` for several processes)"),
    "evaluate": ("carbrand.evaluate", "test-set metrics of an exported model"),
    "predict": ("carbrand.predict", "which brand is this? top-k brands for image files or folders"),
    "export": ("carbrand.export", "write the model as ONNX or TorchScript with its input contract"),
    "serve": ("carbrand.serve.command", "an HTTP service and web page that answer which brand a photo shows"),
    "bench": ("carbrand.bench.command", "measure loader and training throughput (images/s, JSON)"),
    "demo": ("carbrand.demo.command", "generate a demo dataset, then prepare, train, evaluate and predict on it"),
}


def top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carbrand", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def command_parser(name: str):
    """Import only the chosen command's module: `carbrand predict` need not load the trainer."""
    module = importlib.import_module(COMMANDS[name][0])
    description = (module.__doc__ or COMMANDS[name][1]).strip()
    parser = argparse.ArgumentParser(prog=f"carbrand {name}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        top_level_parser().parse_args(argv)  # prints usage or help and exits
    return run_command(argv[0], argv[1:])


def run_command(name: str, argv: list[str] | None = None) -> int:
    """Parse one command's arguments and run it; also what `python carbrand/train.py` etc. call."""
    parser, module = command_parser(name)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return int(module.run(args) or 0)
    except CarbrandError as error:
        print(f"carbrand {name}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"carbrand {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
