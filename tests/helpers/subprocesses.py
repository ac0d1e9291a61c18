"""The product run as a real process: the environment it gets, and the check that it succeeded."""

from __future__ import annotations

import os
import subprocess

FAILURE_TAIL = 4000  # characters from the end of a failed process's output that the failure message shows


def subprocess_environment() -> dict[str, str]:
    """This environment with W&B off and quiet, unbuffered output, and every GPU visible."""
    env = dict(os.environ)
    env.update(WANDB_MODE="disabled", PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def assert_ok(result: subprocess.CompletedProcess, log: str | None = None) -> None:
    """Exit code 0, or fail showing the code and the end of stderr (of `log` where the output went to a file)."""
    __tracebackhide__ = True  # pytest points at the caller's line
    output = result.stderr if log is None else log
    assert result.returncode == 0, f"exit code {result.returncode}:\n{output[-FAILURE_TAIL:]}"
