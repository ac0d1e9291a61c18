"""Running one command: its own argument parser, a `CarbrandError` as one line and its exit code,
and a package module given to a launcher as a file re-run as that module.

Every command module (`carbrand.train`, `carbrand.evaluate`, `carbrand.inference.predict`, ...)
exposes `add_arguments(parser)` and `run(args) -> int`; `carbrand.cli` dispatches to them by name
through `run_command_module`, and each module's own `main()` calls it for `python -m`. Nothing
here imports a command module: the direction is cli -> commands -> this core.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn

from carbrand.errors import CarbrandError

EXIT_CODE_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def command_parser(name: str, module: ModuleType) -> argparse.ArgumentParser:
    """`carbrand NAME`'s parser: the module's docstring as its description, its own arguments."""
    parser = argparse.ArgumentParser(prog=f"carbrand {name}", description=(module.__doc__ or "").strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return parser


def run_command_module(name: str, module: ModuleType, argv: list[str] | None = None) -> int:
    """Parse `argv` (default: the process's arguments) with the module's parser and run it.

    A `CarbrandError` raised anywhere becomes `carbrand NAME: error: ...` on stderr and its exit
    code (2 for usage errors); Ctrl-C is one line and 130; anything else keeps its traceback (a bug).
    """
    args = command_parser(name, module).parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return int(module.run(args) or 0)
    except CarbrandError as error:
        print(f"carbrand {name}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"carbrand {name}: interrupted", file=sys.stderr)
        return EXIT_CODE_INTERRUPTED


def rerun_as_module(module_name: str) -> NoReturn:
    """Replace this process with `python [its interpreter options] -P -m MODULE_NAME [its arguments]`,
    importing from the checkout that holds the file.

    `accelerate launch carbrand/train.py` and torchrun start the file as a script, and Python then
    puts the script's folder, carbrand/, first on the import path, where its folders and modules
    (config, data, metrics, evaluate, ...) would shadow top-level packages of the same names. Run
    as its module instead, the file imports like `python -m carbrand.train`, with no edit of the
    import path. The package is looked up first in the folder that holds the file's package (through
    PYTHONPATH, which the processes it starts inherit), and not in the working directory (-P): the
    file named on the command line is the code that runs, whichever carbrand is installed. exec keeps
    the process id, so a launcher that watches or signals the process is unaffected.
    """
    script = Path(sys.argv[0]).resolve()
    package_root = script.parents[module_name.count(".")]  # carbrand.train: .../carbrand/train.py -> ...
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package_root), os.environ.get("PYTHONPATH")]))
    interpreter_options = sys.orig_argv[1: len(sys.orig_argv) - len(sys.argv)]
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []  # -P: no working directory on the import path
    command = [sys.executable, *interpreter_options, *safe_path, "-m", module_name, *sys.argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)
