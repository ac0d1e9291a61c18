"""A package module given to a launcher as a file re-runs itself as its module (carbrand/command_line.py):
the file's folder then shadows nothing, the file named is the code that runs (not another copy of the
package in the working directory), and the interpreter's options, the arguments and the process stay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from carbrand.command_line import run_command_module
from carbrand.errors import ConfigError
from tests.helpers.paths import REPO

TOOL = '''
from carbrand.command_line import rerun_as_module

if __name__ == "__main__" and not __package__:
    rerun_as_module("toolbox.tool")

import json
import os
import sys

print(json.__name__, json.__file__ == {own_json!r}, sys.flags.optimize, os.getpid(), sys.argv[1:], flush=True)
'''


def make_package(root: Path, tool: str) -> Path:
    package = root / "toolbox"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "json.py").write_text("")  # the folder's own json.py: as a script's folder, it would shadow the stdlib's
    (package / "tool.py").write_text(tool)
    return package


def test_a_file_run_as_a_script_reruns_as_its_module_in_the_same_process(tmp_path: Path):
    package = make_package(tmp_path / "checkout", TOOL.format(own_json=str(tmp_path / "checkout" / "toolbox" / "json.py")))
    # another copy of the package in the working directory: `-m toolbox.tool` must not pick it up
    make_package(tmp_path / "elsewhere", 'print("the copy in the working directory ran")')
    # Popen knows the pid it started; the script prints its own after the re-run
    process = subprocess.Popen([sys.executable, "-O", str(package / "tool.py"), "a b", "--c=d"], cwd=tmp_path / "elsewhere",
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "working directory" not in stdout, "the module was imported from the working directory, not the file's checkout"
    name, own_json, optimize, pid, arguments = stdout.strip().split(" ", 4)
    assert (name, own_json) == ("json", "False"), "the script's folder shadowed the standard library's json"
    assert optimize == "1", "the interpreter option -O was lost"
    assert int(pid) == process.pid, "the module ran in another process: a launcher would lose track of it"
    assert arguments == "['a b', '--c=d']"


def test_the_entry_point_files_answer_as_their_commands():
    for name in ("train", "evaluate"):
        result = subprocess.run([sys.executable, str(REPO / "carbrand" / f"{name}.py"), "--help"], capture_output=True,
                                text=True, timeout=120, cwd=REPO)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: carbrand {name}"), result.stdout[:200]


class FailingCommand:
    """A stand-in command module whose run raises `error`."""

    __doc__ = "a command that fails"

    def __init__(self, error: BaseException):
        self.error = error

    def add_arguments(self, parser) -> None:
        pass

    def run(self, args) -> int:
        raise self.error


def test_under_torchruns_agent_an_error_is_left_in_its_error_file_one_line_for_carbrand_a_traceback_for_a_bug(
        tmp_path: Path, monkeypatch, capfd):
    """torchrun's failure report shows what the worker left in TORCHELASTIC_ERROR_FILE (docs/FAILURES.md)."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert run_command_module("train", FailingCommand(ConfigError("unknown config key 'train.nope'")), []) == 2
    line = "carbrand train: error: unknown config key 'train.nope'"
    assert capfd.readouterr().err == line + "\n"
    recorded = json.loads(error_file.read_text())["message"]
    assert recorded["message"] == line and "py_callstack" not in recorded["extraInfo"], recorded

    error_file.unlink()
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback, and torch's record files it for the report
        run_command_module("train", FailingCommand(ZeroDivisionError("a bug")), [])
    recorded = json.loads(error_file.read_text())["message"]
    assert recorded["message"] == "ZeroDivisionError: a bug", recorded
    assert "Traceback" in recorded["extraInfo"]["py_callstack"], recorded
