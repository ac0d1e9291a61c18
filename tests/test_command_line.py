"""A package module given to a launcher as a file re-runs itself as its module (carbrand/command_line.py):
the file's folder then shadows nothing, the file named is the code that runs (not another copy of the
package in the working directory), and the interpreter's options, the arguments and the process stay."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
