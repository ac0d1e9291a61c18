"""Helpers for tests that start real training processes (1 process, or 2 over gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers.paths import HELPERS, REPO
from tests.helpers.ports import free_port, port_was_taken
from tests.helpers.subprocesses import subprocess_environment

TRAIN_SCRIPT = REPO / "carbrand" / "train.py"
CPU_RECIPE = REPO / "configs" / "cars5_cpu.yaml"
PROBE = HELPERS / "rank_state_probe.py"


def launch_command(num_processes: int, script: Path = TRAIN_SCRIPT) -> list[str]:
    if num_processes == 1:
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), str(script)]


# Behaviour tests train at 64 px to stay quick; the learning test uses the recipe unchanged.
QUICK = ("data.image_size=64",)


def train_command(prepared: Path, run_dir: Path, *overrides: str, num_processes: int = 1,
                  script: Path = TRAIN_SCRIPT) -> list[str]:
    """`script` (the trainer, or a test-only wrapper that starts it) on the CPU recipe, at the quick size."""
    return launch_command(num_processes, script) + [
        "--config", str(CPU_RECIPE), f"data.manifest={prepared}", f"output.dir={run_dir}", *QUICK, *overrides]


def probed_train_command(prepared: Path, run_dir: Path, out: Path, *overrides: str, num_processes: int = 2) -> list[str]:
    """train_command, started through tests/helpers/rank_state_probe.py: each rank records its own state in `out`.
    Probe options (--record-mixes, ...) may stand among the overrides."""
    command = train_command(prepared, run_dir, *overrides, num_processes=num_processes)
    at = command.index(str(TRAIN_SCRIPT))
    return command[:at] + [str(PROBE), str(out)] + command[at + 1:]


def run_training(prepared: Path, run_dir: Path, *overrides: str, num_processes: int = 1, timeout: float = 600,
                 env: dict | None = None, script: Path = TRAIN_SCRIPT) -> subprocess.CompletedProcess:
    """The trainer to its end; several processes: once more on a fresh port if their rendezvous port was taken."""
    for attempt in range(3 if num_processes > 1 else 1):
        result = subprocess.run(train_command(prepared, run_dir, *overrides, num_processes=num_processes, script=script),
                                capture_output=True, text=True, timeout=timeout, env=env or subprocess_environment(), cwd=REPO)
        if result.returncode == 0 or not port_was_taken(result.stderr):
            break
    return result


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def last_value(records: list[dict], key: str):
    values = [r[key] for r in records if key in r]
    assert values, f"{key} was never logged"
    return values[-1]
