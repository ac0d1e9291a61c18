"""Running one command: its own argument parser, a `CarbrandError` as one line and its exit code,
and a package module given to a launcher as a file re-run as that module.

Every command module (`carbrand.train`, `carbrand.evaluate`, `carbrand.inference.predict`, ...)
exposes `add_arguments(parser)` and `run(args) -> int`; `carbrand.cli` dispatches to them by name
through `run_command_module`, and each module's own `main()` calls it for `python -m`. Nothing
here imports a command module: the direction is cli -> commands -> this core.

Under torchrun's agent (torchrun, `accelerate launch` with several processes, launch/torchrun.sh)
each worker also leaves its error where the agent looks (TORCHELASTIC_ERROR_FILE): the agent's
failure report then shows the one line, or a bug's traceback, instead of a link to its docs.
What each launcher makes of the line and the exit code: docs/FAILURES.md, "Under each launcher".
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import NoReturn

from carbrand.errors import CarbrandError

EXIT_CODE_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
# Set by torchrun's agent for each worker: the file it reads, when the worker fails, for its failure report
ERROR_FILE_VARIABLE = "TORCHELASTIC_ERROR_FILE"


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
    run = functools.partial(run_with_one_line_errors, name, module, args)
    if os.environ.get(ERROR_FILE_VARIABLE):
        # torch elastic's own means: a bug's traceback goes into the agent's report as this rank's root cause
        from torch.distributed.elastic.multiprocessing.errors import record

        run = record(run)
    return run()


def run_with_one_line_errors(name: str, module: ModuleType, args: argparse.Namespace) -> int:
    try:
        return int(module.run(args) or 0)
    except CarbrandError as error:
        line = f"carbrand {name}: error: {error}"
        print(line, file=sys.stderr)
        record_error_for_launcher(line)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"carbrand {name}: interrupted", file=sys.stderr)
        return EXIT_CODE_INTERRUPTED


def record_error_for_launcher(line: str) -> None:
    """Write `line` as this process's error for torchrun's agent, where it asked for one (TORCHELASTIC_ERROR_FILE).

    The format is what torch's ErrorHandler writes, without the call stack: the agent's report then shows
    the line where it would show a traceback, and the failure's time orders the root cause.
    """
    path = os.environ.get(ERROR_FILE_VARIABLE)
    if not path:
        return
    entry = {"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}
    try:
        Path(path).write_text(json.dumps(entry))
    except OSError:
        pass  # the report then lacks the line; stderr has it already


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
