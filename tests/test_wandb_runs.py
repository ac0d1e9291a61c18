"""Weights & Biases: a restarted training continues the same W&B run, and WANDB_PROJECT / WANDB_ENTITY win over
the config. Checked in the offline run files written by the trainer's tracker (`carbrand.tracking.Tracker`, which
`set_up` makes at every start of a training), read back with tests/helpers/wandb_records.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from carbrand.config import load_config
from carbrand.tracking import Tracker
from tests.helpers.training_runs import CPU_RECIPE
from tests.helpers.wandb_records import read_records

# Variables that would steer W&B from the test machine's environment: each test sets what it means to.
WANDB_VARIABLES = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME")


@pytest.fixture
def wandb_environment(monkeypatch):
    for name in WANDB_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    return monkeypatch


def start_and_finish(run_dir: Path, step: int) -> None:
    """What one start of the trainer does with W&B: open the tracker, log at a step, finish."""
    config = load_config(CPU_RECIPE, [f"output.dir={run_dir}", "wandb.mode=offline", "wandb.project=config-project",
                                      "wandb.entity=config-team"])
    tracker = Tracker(run_dir, config, is_main=True)
    assert tracker.run is not None, "W&B did not start in offline mode"
    tracker.log({"train/loss": 1.0}, step=step)
    tracker.finish()


def run_records(path: Path, timeout: float = 60) -> list:
    """The run records of a .wandb file; W&B's service may still be writing it when `finish` returns."""
    deadline = time.monotonic() + timeout
    while True:
        records = [r.run for r in read_records(path) if r.WhichOneof("record_type") == "run"] if path.stat().st_size else []
        if records or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def offline_runs(run_dir: Path) -> list[dict[str, str]]:
    """id, project and entity of each offline run under RUN/wandb, oldest first, as its run record holds them."""
    found = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        records = run_records(path)
        assert records, f"{path} holds no run record"
        found.append({"id": records[0].run_id, "project": records[0].project, "entity": records[0].entity,
                      "file": path.name})
    return found


def test_a_restarted_training_continues_the_same_wandb_run(tmp_path, wandb_environment):
    run_dir = tmp_path / "run"
    start_and_finish(run_dir, step=4)
    start_and_finish(run_dir, step=8)  # the restart: train.resume=auto in the same output.dir
    runs = offline_runs(run_dir)
    assert len(runs) == 2, runs
    assert runs[0]["id"] == runs[1]["id"], runs
    assert runs[1]["file"] == f"run-{runs[0]['id']}.wandb"
    other = tmp_path / "other"
    start_and_finish(other, step=4)  # another run directory is another W&B run
    assert offline_runs(other)[0]["id"] != runs[0]["id"]
    assert {(r["project"], r["entity"]) for r in runs} == {("config-project", "config-team")}  # the config's, no env


def test_wandb_project_and_entity_variables_win_over_the_config(tmp_path, wandb_environment):
    wandb_environment.setenv("WANDB_PROJECT", "env-project")
    wandb_environment.setenv("WANDB_ENTITY", "env-team")
    start_and_finish(tmp_path / "run", step=1)
    [run] = offline_runs(tmp_path / "run")
    assert (run["project"], run["entity"]) == ("env-project", "env-team"), run
