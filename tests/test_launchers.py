"""The launchers in launch/ without SLURM: two node ranks on this host form one job."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers.paths import REPO
from tests.helpers.ports import free_port
from tests.helpers.subprocesses import subprocess_environment
from tests.helpers.training_runs import CPU_RECIPE, QUICK, TRAIN_SCRIPT, last_value, read_metrics

TORCHRUN_WRAPPER = REPO / "launch" / "torchrun.sh"


def start_nodes(command_for_rank, logs: Path, env_for_rank) -> list[subprocess.Popen]:
    """Node ranks 0 and 1 as two launchers on this host, each logging to logs/node<rank>.log."""
    logs.mkdir(exist_ok=True)
    return [subprocess.Popen(command_for_rank(rank), stdout=(logs / f"node{rank}.log").open("w"), stderr=subprocess.STDOUT,
                             env=env_for_rank(rank), cwd=REPO) for rank in (0, 1)]


def finish(nodes: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    try:
        return [node.wait(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()


def node_logs(logs: Path) -> str:
    return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}" for path in sorted(logs.glob("node*.log")))


@pytest.mark.slow
def test_torchrun_wrapper_two_node_ranks_form_one_job_that_stops_on_usr1_and_resumes(prepared_cars5, tmp_path):
    run_dir, logs, port = tmp_path / "run", tmp_path / "logs", free_port()
    train = [str(TORCHRUN_WRAPPER), str(TRAIN_SCRIPT), "--config", str(CPU_RECIPE), f"data.manifest={prepared_cars5}",
             f"output.dir={run_dir}", *QUICK, "train.epochs=1", "train.log_every=1"]

    def env(rank: int) -> dict:
        # one thread each: the two "nodes" share this host's cores; no LOCAL_ADDR: each node finds its own
        return subprocess_environment() | {"NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                                           "MASTER_PORT": str(port), "NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1"}

    nodes = start_nodes(lambda rank: train, logs, env)
    wait_for_training_step(run_dir, nodes, logs)
    # The workers meet where the rank-0 launcher says it is: the given address, not this host's name
    # (socket.getfqdn(), which other nodes may not resolve). Node 1 tells its address the same way.
    addresses = {rank: worker.environ().get("MASTER_ADDR") for rank, worker in workers_by_rank(nodes).items()}
    assert addresses == {0: "127.0.0.1", 1: "127.0.0.1"}, addresses
    assert "launch/torchrun.sh: node 1/2 at 127.0.0.1," in (logs / "node1.log").read_text(), node_logs(logs)
    for node in nodes:  # the launchers only: each worker runs in a session of its own, out of their reach
        node.send_signal(signal.SIGUSR1)
    assert finish(nodes) == [143, 143], node_logs(logs)
    records = read_metrics(run_dir)
    assert last_value(records, "run/world_size") == 2  # one job, not two
    stop = [r for r in records if "run/ranks_signalled" in r]
    assert len(stop) == 1 and stop[0]["run/ranks_signalled"] == 2, node_logs(logs)
    assert stop[0]["run/stop_signal"] == signal.SIGUSR1
    stopped_at, total = stop[0]["step"], last_value(records, "run/total_steps")
    assert stopped_at < total

    logs_again = tmp_path / "logs_again"
    nodes = start_nodes(lambda rank: train, logs_again, env)
    assert finish(nodes) == [0, 0], node_logs(logs_again)
    records = read_metrics(run_dir)
    assert last_value(records, "run/restarts") == 1
    restart = [i for i, r in enumerate(records) if r.get("run/restarts") == 1][0]
    assert [r["step"] for r in records[restart:] if "train/loss" in r][0] == stopped_at + 1
    assert max(r["step"] for r in records) == total
    assert last_value(records, "run/ranks_agree") is True
    assert (run_dir / "best" / "model.safetensors").is_file()


def workers_by_rank(nodes: list[subprocess.Popen]) -> dict[int, psutil.Process]:
    """The training processes under the launchers, by their RANK (a loader's child shares its rank's environment)."""
    workers = {}
    for node in nodes:
        for child in psutil.Process(node.pid).children(recursive=True):
            try:
                if "RANK" in child.environ():
                    workers[int(child.environ()["RANK"])] = child
            except psutil.Error:
                continue  # ended while we looked
    return workers


def wait_for_training_step(run_dir: Path, nodes: list[subprocess.Popen], logs: Path, timeout: float = 300) -> None:
    deadline, metrics = time.monotonic() + timeout, run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and '"train/loss"' in metrics.read_text():
            return
        assert all(node.poll() is None for node in nodes), node_logs(logs)
        time.sleep(0.2)
    pytest.fail(f"no training step logged in {timeout} s\n{node_logs(logs)}")


@pytest.mark.slow
def test_accelerate_multi_node_config_two_machine_ranks_form_one_job(prepared_cars5, tmp_path):
    run_dir, logs, port = tmp_path / "run", tmp_path / "logs", free_port()

    def command(rank: int) -> list[str]:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/accelerate_multi_node.yaml"),
                "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(port), str(TRAIN_SCRIPT), "--config", str(CPU_RECIPE),
                f"data.manifest={prepared_cars5}", f"output.dir={run_dir}", *QUICK, "train.max_steps=2"]

    nodes = start_nodes(command, logs, lambda rank: subprocess_environment() | {"OMP_NUM_THREADS": "1"})
    assert finish(nodes) == [0, 0], node_logs(logs)
    records = read_metrics(run_dir)
    assert last_value(records, "run/world_size") == 2
    assert max(r["step"] for r in records) == 2
    assert (run_dir / "best" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["accelerate_single_node.yaml", "accelerate_multi_node.yaml"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "launch" / name))  # unknown keys or values raise here
    assert config.distributed_type == "MULTI_GPU" and config.num_processes == 8 * config.num_machines


@pytest.mark.parametrize(("variables", "message"), [
    ({"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK 2 must be below NNODES 2"),
    ({"NPROC_PER_NODE": "eight"}, "NPROC_PER_NODE must be a whole number, not 'eight'"),
])
def test_torchrun_wrapper_rejects_a_bad_topology_in_one_line(variables, message):
    result = subprocess.run([str(TORCHRUN_WRAPPER), str(TRAIN_SCRIPT)], capture_output=True, text=True, timeout=60,
                            env=subprocess_environment() | variables, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip() == f"launch/torchrun.sh: {message}"


@pytest.mark.slow
def test_torchrun_wrapper_forwards_sigterm_to_every_worker_outside_slurm(prepared_cars5, tmp_path):
    """A plain `kill` of launch/torchrun.sh, with no SLURM to signal the workers too (they run in sessions of their
    own): every worker must still hear it, checkpoint at its next step, and the launcher exit with 143."""
    run_dir, logs, port = tmp_path / "run", tmp_path / "logs", free_port()
    logs.mkdir()
    command = [str(TORCHRUN_WRAPPER), str(TRAIN_SCRIPT), "--config", str(CPU_RECIPE), f"data.manifest={prepared_cars5}",
               f"output.dir={run_dir}", "data.image_size=32", "data.workers=0", "train.epochs=5", "train.log_every=1"]
    env = subprocess_environment() | {"NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                      "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(command, stdout=(logs / "node0.log").open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
    workers = {}
    try:
        wait_for_training_step(run_dir, [launcher], logs)
        workers = workers_by_rank([launcher])
        assert sorted(workers) == [0, 1], workers
        launcher.send_signal(signal.SIGTERM)
        assert finish([launcher]) == [143], node_logs(logs)
    finally:
        for worker in workers.values():  # a launcher that died of the signal leaves its workers training
            if worker.is_running():
                worker.kill()
    records = read_metrics(run_dir)
    stops = [r for r in records if "run/ranks_signalled" in r]
    assert len(stops) == 1 and stops[0]["run/stop_signal"] == signal.SIGTERM, node_logs(logs)
    assert stops[0]["run/ranks_signalled"] == 2, "both workers must get the signal"
    stopped_at = stops[0]["step"]
    assert stopped_at < last_value(records, "run/total_steps"), "the run ended before the signal: this proves nothing"
    assert (run_dir / "last").resolve() == (run_dir / "checkpoints" / f"step_{stopped_at}").resolve()
