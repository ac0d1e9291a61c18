"""The launchers in launch/ without SLURM: two node ranks on this host form one job."""

from __future__ import annotations

import importlib.util
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


# Errors under every launcher (docs/FAILURES.md, "Under each launcher"): carbrand's one line comes first, and
# the exit code is carbrand's wherever the launcher passes it on. One case per launcher, each failing before
# training: what differs between launchers is their handling of a failed worker, not which input was bad (a
# run directory in use is one more CarbrandError, raised on every rank alike). `carbrand train` itself, with
# no launcher: tests/faults/test_bad_input.py and, as a process of its own, tests/faults/test_run_lock.py.

def launcher_command(launcher: str, port: int) -> list[str]:
    """The launcher as docs/FAILURES.md names it, up to the trainer and its arguments; 2 processes where it starts several."""
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port), str(TRAIN_SCRIPT)]
    if launcher == "launch/torchrun.sh":
        return [str(TORCHRUN_WRAPPER), str(TRAIN_SCRIPT)]
    # accelerate launch -q, as the docs run it; the settings given, as `accelerate config` would, so that
    # Accelerate's notice about the values it defaulted does not come first
    processes = ["--multi_gpu", "--num_processes", "2"] if launcher == "accelerate launch -q (2 processes)" else ["--num_processes", "1"]
    return [sys.executable, "-m", "accelerate.commands.launch", "-q", *processes, "--num_machines", "1", "--mixed_precision",
            "no", "--dynamo_backend", "no", "--main_process_port", str(port), str(TRAIN_SCRIPT)]


def first_error_line(stderr: str) -> str:
    """The first line of stderr, which must be carbrand's one line, with no traceback before it."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("carbrand train: error: "), stderr[-4000:]
    assert "Traceback" not in stderr[:stderr.index(lines[0])], stderr[-4000:]
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(("launcher", "problem", "exit_code", "named"), [
    ("accelerate launch -q (1 process)", "missing data", 1, "prepared dataset not found: /nonexistent"),  # 1 for any failure
    ("accelerate launch -q (2 processes)", "config", 1, "unknown config key 'train.nope'"),
    ("torchrun", "missing data", 1, "prepared dataset not found: /nonexistent"),  # torchrun says 1 for any failure
    ("launch/torchrun.sh", "config", 2, "unknown config key 'train.nope'"),  # the failed worker's own code
])
def test_an_error_before_training_is_carbrands_one_line_first_under_each_launcher(prepared_cars5, tmp_path, launcher,
                                                                                    problem, exit_code, named):
    run_dir, port = tmp_path / "run", free_port()
    overrides = {"config": ["train.nope=1"], "missing data": ["data.manifest=/nonexistent"]}[problem]
    command = launcher_command(launcher, port) + [
        "--config", str(CPU_RECIPE), f"data.manifest={prepared_cars5}", f"output.dir={run_dir}", "data.image_size=32",
        "data.workers=0", *overrides]
    env = subprocess_environment() | {"OMP_NUM_THREADS": "1", "NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                                      "MASTER_PORT": str(port), "NPROC_PER_NODE": "2"}  # the last four: launch/torchrun.sh's
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert named in first_error_line(result.stderr), result.stderr[-4000:]
    assert result.returncode == exit_code, result.stderr[-4000:]
    if launcher in ("torchrun", "accelerate launch -q (2 processes)"):
        # torchrun's failure report (Accelerate runs the same agent) shows the line as the root cause, not a link to docs
        report = result.stderr[result.stderr.index("Root Cause (first observed failure):"):]
        assert "traceback : carbrand train: error: " in report and named in report, result.stderr[-4000:]


def forward_signals_module():
    """launch/torchrun_forward_signals.py, a script outside the package, loaded as a module."""
    spec = importlib.util.spec_from_file_location("torchrun_forward_signals", REPO / "launch" / "torchrun_forward_signals.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def failed_workers(*exits: tuple[int, int]):
    """torchrun's ChildFailedError for workers that failed with (exit code, second of failure), by rank; no error files."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    failures = {}
    for rank, (code, second) in enumerate(exits):
        failures[rank] = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file="<N/A>")
        failures[rank].timestamp = 1_700_000_000 + second
    return ChildFailedError("carbrand/train.py", failures)


@pytest.mark.parametrize(("exits", "stop_requested", "expected"), [
    (((2, 0), (2, 0)), False, 2),  # a config error on every rank: carbrand's code, passed on
    # rank 1 killed (the root cause); rank 0, whose collective then failed, said so and exited 1
    (((1, 5), (-9, 1)), False, 1),
    # rank 0 stopped by torchrun (SIGTERM) in the same second as rank 1's error: never 143, which means "requeue"
    (((-15, 3), (2, 3)), False, 2),
    (((-9, 0),), False, 137),  # only killed workers: 128 + the signal, as a shell says
    (((143, 4), (143, 4)), False, 143),  # stopped on request, a checkpoint saved
    (((1, 4), (-15, 4)), True, 143),  # the launcher was signalled: the workers' stop, whatever they exited with
])
def test_torchrun_wrapper_exits_with_the_first_own_exit_code_of_its_failed_workers(exits, stop_requested, expected):
    assert forward_signals_module().failed_exit_code(failed_workers(*exits), stop_requested=stop_requested) == expected


@pytest.mark.slow
def test_torchrun_wrapper_that_loses_the_rendezvous_store_says_so_in_one_line(tmp_path):
    """A node's launcher whose rendezvous store (served by node 0's launcher) is gone: under SLURM, when a rank on
    node 0 dies and its launcher exits. One line naming the store instead of torch's chained traceback. Here the
    store was never there, and the wait for it is cut to 2 s (read_timeout; launch/torchrun.sh leaves torch's 60 s)."""
    worker, port = tmp_path / "worker.py", free_port()
    worker.write_text("raise SystemExit('a worker ran although the rendezvous failed')\n")
    command = [sys.executable, str(REPO / "launch" / "torchrun_forward_signals.py"), "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lost-store",
               "--rdzv-conf", "is_host=0,read_timeout=2", str(worker)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=subprocess_environment(), cwd=REPO)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"launch/torchrun.sh: lost the rendezvous store at 127.0.0.1:{port} ("), last
    assert "its log says why" in last, last
