"""slurm/train.sbatch and slurm/evaluate.sbatch on a real two-node SLURM cluster started on this host.

The cluster (tests/helpers/slurm_cluster.py) is Debian's SLURM 22.05; tests/run.sh installs it. Without
it these tests fail with the install command; CARBRAND_SKIP_SLURM=1 skips them on purpose.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers.paths import REPO
from tests.helpers.ports import free_port
from tests.helpers.slurm_cluster import SlurmCluster
from tests.helpers.subprocesses import assert_ok, subprocess_environment
from tests.helpers.training_runs import CPU_RECIPE, QUICK, last_value, read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.environ.get("CARBRAND_SKIP_SLURM") == "1":
        pytest.skip("CARBRAND_SKIP_SLURM=1")
    started = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    try:
        yield started
    finally:
        started.stop()


def job_environment(cluster: SlurmCluster, processes_per_node: int) -> dict[str, str]:
    """What a user's shell would hold at `sbatch` time; sbatch exports it to the job."""
    # a free rendezvous port: both "nodes" are this host, and other test runs may be using 20000 + job id
    return subprocess_environment() | {"SLURM_CONF": cluster.env["SLURM_CONF"],
                                       "NPROC_PER_NODE": str(processes_per_node), "MASTER_PORT": str(free_port())}


def train_job(mode: str, prepared: Path, run_dir: Path, log: Path, *overrides: str) -> list[str]:
    """sbatch in `mode` (--wait: until the job ends; --parsable: print the job id and return)."""
    return ["sbatch", mode, "-N", "2", "--cpus-per-task=2", f"--output={log}", "slurm/train.sbatch", str(CPU_RECIPE),
            f"data.manifest={prepared}", f"output.dir={run_dir}", *QUICK, *overrides]


def test_two_nodes_train_then_evaluate(cluster, prepared_cars5, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    env = job_environment(cluster, processes_per_node=1)
    submitted = cluster.run(train_job("--wait", prepared_cars5, run_dir, log, "train.epochs=1"),
                            env=env, cwd=REPO, timeout=600, check=False)
    text = log.read_text() if log.exists() else submitted.stderr
    assert_ok(submitted, log=text)
    assert "2 node(s) n[1-2] x 1 process(es) = world size 2" in text, text[:2000]  # the resolved topology
    assert "rendezvous c10d at 127.0.0.1:" in text  # NodeAddr: the node names n1, n2 do not resolve
    records = read_metrics(run_dir)
    assert last_value(records, "run/world_size") == 2
    assert last_value(records, "run/ranks_agree") is True
    assert max(r["step"] for r in records) == last_value(records, "run/total_steps")
    assert (run_dir / "best" / "model.safetensors").is_file() and (run_dir / "last").is_symlink()

    out, eval_log = tmp_path / "eval", tmp_path / "evaluate.log"
    evaluated = cluster.run(["sbatch", "--wait", "-N", "2", f"--output={eval_log}", "slurm/evaluate.sbatch",
                             str(run_dir / "best"), str(prepared_cars5), "--split", "test", "--out", str(out)],
                            env=env, cwd=REPO, timeout=600, check=False)
    text = eval_log.read_text() if eval_log.exists() else evaluated.stderr
    assert_ok(evaluated, log=text)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 100  # every test image once, over 2 processes on 2 nodes
    assert "(2 process(es)" in text


@pytest.mark.parametrize("stop", ["warning_signal", "requeue"])
def test_stopped_job_checkpoints_requeues_and_resumes(cluster, prepared_cars5, tmp_path, stop):
    """USR1 (what --signal=USR1@90 sends before the time limit) or an admin's requeue (SIGTERM to the whole job)."""
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    job = cluster.run(train_job("--parsable", prepared_cars5, run_dir, log, "train.epochs=3", "train.log_every=1"),
                      env=job_environment(cluster, processes_per_node=2), cwd=REPO).stdout.strip()
    wait_for_training(cluster, job, run_dir, log)
    if stop == "warning_signal":
        cluster.run(["scancel", "--signal=USR1", job])  # to every process of the job's steps, as SLURM's warning
    else:
        cluster.run(["scontrol", "requeue", job])
    final = cluster.wait_for_end(job, timeout=600)
    text = log.read_text()
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", (final, text[-4000:])
    assert final["Restarts"] == "1", final

    records = read_metrics(run_dir)
    stops = [r for r in records if "run/ranks_signalled" in r]
    assert len(stops) == 1, text[-4000:]
    expected_signal = signal.SIGUSR1 if stop == "warning_signal" else signal.SIGTERM
    assert stops[0]["run/stop_signal"] == expected_signal
    assert stops[0]["run/ranks_signalled"] == 4, "every rank on both nodes must get the signal"
    stopped_at, total = stops[0]["step"], last_value(records, "run/total_steps")
    assert stopped_at < total, "the job ended before the stop: the test proves nothing"
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at}'} at step {stopped_at} (restart 1)" in text
    assert "restart 1;" in text  # the batch script's start line after the requeue (SLURM_RESTART_COUNT)
    if stop == "warning_signal":
        assert "requeueing" in text  # the batch script requeued itself on exit code 143
    assert last_value(records, "run/restarts") == 1
    restart = [i for i, r in enumerate(records) if r.get("run/restarts") == 1][0]
    steps_after = [r["step"] for r in records[restart:] if "train/loss" in r]
    assert steps_after[0] == stopped_at + 1, "the step counter must continue, not restart"
    assert max(r["step"] for r in records) == total
    assert last_value(records, "run/ranks_agree") is True
    assert (run_dir / "best" / "model.safetensors").is_file()


def wait_for_training(cluster: SlurmCluster, job: str, run_dir: Path, log: Path, timeout: float = 300) -> None:
    """Until the job has logged a training step (all ranks are in the loop, handlers installed)."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and '"train/loss"' in metrics.read_text():
            return
        state = cluster.job_state(job)
        assert state.get("JobState") in ("PENDING", "RUNNING"), (state, log.read_text()[-4000:] if log.exists() else "")
        time.sleep(0.2)
    pytest.fail(f"job {job} logged no training step in {timeout} s")
