"""Real training processes to inject faults into: start, wait for a step or a checkpoint, find a rank, read output.

Output goes to files, not pipes, so a chatty progress bar can never block a process that
the test is waiting for.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.helpers.paths import REPO
from tests.helpers.ports import free_port
from tests.helpers.subprocesses import subprocess_environment
from tests.helpers.training_runs import train_command

# Fault tests train at 32 px (the smallest allowed) with the loading in the training process: what they
# check does not depend on either, and on a 2-core CI machine this halves the time of a short run.
TINY = ("data.image_size=32", "data.workers=0")


def fault_environment() -> dict[str, str]:
    """The tests' usual environment, with one CPU thread per process.

    Several processes share 2 cores in CI; torch's thread pool then spins while it waits and a
    short run takes 5x longer (measured: 54 s against 9 s for 16 steps on a loaded 2-core box).
    """
    return subprocess_environment() | {"OMP_NUM_THREADS": "1"}


@dataclass
class Run:
    """One started process (a trainer, or the launcher of several) and where its output goes."""

    process: subprocess.Popen
    stdout_path: Path
    stderr_path: Path

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def start(command: list[str], logs: Path, env: dict | None = None, **popen) -> Run:
    logs.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = logs / "stdout.txt", logs / "stderr.txt"
    with stdout_path.open("w") as out, stderr_path.open("w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env or fault_environment(), cwd=REPO, **popen)
    return Run(process, stdout_path, stderr_path)


def start_training(prepared: Path, run_dir: Path, *overrides: str, logs: Path, num_processes: int = 1,
                   wrapper: list[str] | None = None, env: dict | None = None, **popen) -> Run:
    """The trainer as users start it; `wrapper` replaces `python carbrand/train.py` by a test-only script."""
    command = train_command(prepared, run_dir, *TINY, *overrides, num_processes=num_processes)
    if wrapper is not None:
        command = wrapper + command[2:]  # drop `python carbrand/train.py`, keep its arguments
    return start(command, logs, env=env, **popen)


def start_ranks(prepared: Path, run_dir: Path, *overrides: str, logs: Path, world_size: int = 2) -> list[Run]:
    """One process per rank with RANK/WORLD_SIZE/MASTER_* set, as srun starts tasks: no agent to clean up after them."""
    command = train_command(prepared, run_dir, *TINY, *overrides)
    port = str(free_port())
    runs = []
    for rank in range(world_size):
        env = fault_environment() | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                                          "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                                          "MASTER_PORT": port}
        runs.append(start(command, logs / f"rank{rank}", env=env))
    return runs


def wait_until(condition, runs: Run | list[Run], timeout: float = 240, what: str = "the condition") -> None:
    """Poll `condition()`; fail early, with the output, if a process ends before it holds."""
    runs = runs if isinstance(runs, list) else [runs]
    deadline = time.monotonic() + timeout
    while not condition():
        for run in runs:
            if run.process.poll() is not None:
                raise AssertionError(f"process ended (exit {run.process.returncode}) before {what}:\n{run.stderr[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def logged_steps(run_dir: Path) -> list[int]:
    """Steps with a train/loss record in metrics.jsonl (a line being written is skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "train/loss" in record:
            steps.append(record["step"])
    return steps


def complete_checkpoints(run_dir: Path) -> list[int]:
    """Steps of the checkpoint folders that hold both files a resume needs (the test's own reading, not the product's)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name.split("_")[1]) for p in folder.glob("step_*")
                  if (p / "model.safetensors").is_file() and (p / "training_state.pt").is_file())


def worker_ranks(launcher: Run, world_size: int, timeout: float = 120) -> dict[int, psutil.Process]:
    """The launcher's training processes by global rank (read from their RANK environment variable)."""
    deadline = time.monotonic() + timeout
    while True:
        workers = {}
        for child in psutil.Process(launcher.process.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
                # carbrand/train.py re-runs itself as `-m carbrand.train` (same process); test wrappers end in train.py
                if rank is not None and any(part.endswith("train.py") or part == "carbrand.train" for part in child.cmdline()):
                    workers[int(rank)] = child
            except psutil.Error:
                continue
        if len(workers) == world_size:
            return workers
        if time.monotonic() > deadline:
            raise AssertionError(f"found {len(workers)} of {world_size} training processes")
        time.sleep(0.2)


def error_line(stderr: str, command: str = "train") -> str:
    """The one-line error a failed command ends with; no traceback anywhere."""
    assert "Traceback" not in stderr, stderr[-4000:]
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"carbrand {command}: error: "), stderr[-3000:]
    return lines[-1]


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `path` with its size and modification time: to show nothing changed."""
    if not path.exists():
        return {}
    entries = {}
    for item in [path, *path.rglob("*")]:
        status = item.lstat()
        entries[str(item.relative_to(path))] = (status.st_size if item.is_file() else 0, status.st_mtime_ns)
    return entries
