"""slurm/train.sbatch and slurm/evaluate.sbatch on a real two-node SLURM cluster started on this host,
and slurm/topology.sh on its own with a stand-in `scontrol`.

The cluster (tests/helpers/slurm_cluster.py) is Debian's SLURM 22.05; tests/run.sh installs it. Without
it the cluster tests fail with the install command; CARBRAND_SKIP_SLURM=1 skips them on purpose.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers.paths import REPO
from tests.helpers.ports import ephemeral_ports, free_port
from tests.helpers.slurm_cluster import SlurmCluster
from tests.helpers.subprocesses import assert_ok, subprocess_environment
from tests.helpers.training_runs import CPU_RECIPE, QUICK, last_value, read_metrics

# A MASTER_ADDR left in the submit shell by a run by hand (a documentation address, never contacted):
# sbatch exports it to the job, which must meet at its first node all the same.
STALE_MASTER_ADDR = "203.0.113.9"
NODE_ADDR = "127.0.0.1"  # the test cluster's NodeAddr for n1 and n2, whose names do not resolve


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
    """What a user's shell would hold at `sbatch` time; sbatch exports it to the job. No MASTER_PORT: the job picks one."""
    env = subprocess_environment() | {"SLURM_CONF": cluster.env["SLURM_CONF"], "NPROC_PER_NODE": str(processes_per_node),
                                      "MASTER_ADDR": STALE_MASTER_ADDR}
    env.pop("MASTER_PORT", None)
    return env


def train_job(mode: str, prepared: Path, run_dir: Path, log: Path, *overrides: str) -> list[str]:
    """sbatch in `mode` (--wait: until the job ends; --parsable: print the job id and return)."""
    return ["sbatch", mode, "-N", "2", "--cpus-per-task=2", f"--output={log}", "slurm/train.sbatch", str(CPU_RECIPE),
            f"data.manifest={prepared}", f"output.dir={run_dir}", *QUICK, *overrides]


@pytest.mark.slow
def test_two_nodes_train_then_evaluate_two_splits_at_once(cluster, prepared_cars5, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    env = job_environment(cluster, processes_per_node=1)
    submitted = cluster.run(train_job("--wait", prepared_cars5, run_dir, log, "train.epochs=1"),
                            env=env, cwd=REPO, timeout=600, check=False)
    text = log.read_text() if log.exists() else submitted.stderr
    assert_ok(submitted, log=text)
    assert "2 node(s) n[1-2] x 1 process(es) = world size 2" in text, text[:2000]  # the resolved topology
    # the first node's NodeAddr, not the submit shell's MASTER_ADDR (n1, n2 do not resolve)
    assert f"rendezvous c10d at {NODE_ADDR}:" in text, text[:2000]
    records = read_metrics(run_dir)
    assert last_value(records, "run/world_size") == 2
    assert last_value(records, "run/ranks_agree") is True
    assert max(r["step"] for r in records) == last_value(records, "run/total_steps")
    assert (run_dir / "best" / "model.safetensors").is_file() and (run_dir / "last").is_symlink()

    # Two evaluations running at once, as two users' jobs sharing a first node: each must get a port of its own
    logs = {split: tmp_path / f"evaluate_{split}.log" for split in ("test", "val")}
    jobs = {split: cluster.run(["sbatch", "--parsable", "-N", "2", f"--output={logs[split]}", "slurm/evaluate.sbatch",
                                str(run_dir / "best"), str(prepared_cars5), "--split", split, "--out", str(tmp_path / split)],
                               env=env, cwd=REPO).stdout.strip() for split in logs}
    ends = {split: cluster.wait_for_end(job, timeout=600) for split, job in jobs.items()}
    texts = {split: path.read_text() if path.exists() else "" for split, path in logs.items()}
    for split, end in ends.items():
        assert end["JobState"] == "COMPLETED", (end, texts[split][-4000:])
        assert "(2 process(es)" in texts[split]
    assert ends["val"]["StartTime"] < ends["test"]["EndTime"] and ends["test"]["StartTime"] < ends["val"]["EndTime"], ends
    val_rows = len((prepared_cars5 / "val.csv").read_text().splitlines()) - 1
    for split, samples in (("test", 100), ("val", val_rows)):  # every image once, over 2 processes on 2 nodes
        assert json.loads((tmp_path / split / "metrics.json").read_text())["samples"] == samples

    ports = {name: rendezvous_port(job_log) for name, job_log in (("train", text), *texts.items())}
    assert ports["test"] != ports["val"], ports
    low, high = ephemeral_ports()
    assert not any(low <= port <= high for port in ports.values()), (ports, (low, high))


@pytest.mark.slow
def test_a_config_error_is_carbrands_one_line_first_in_the_job_log_and_the_jobs_exit_code(cluster, prepared_cars5, tmp_path):
    """docs/FAILURES.md, "Under each launcher": the job ends FAILED with carbrand's exit code 2, not requeued, and
    after the batch script's and the launchers' start lines the first thing in the log is carbrand's line."""
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    job = cluster.run(train_job("--parsable", prepared_cars5, run_dir, log, "train.nope=1"),
                      env=job_environment(cluster, processes_per_node=1), cwd=REPO).stdout.strip()
    final = cluster.wait_for_end(job, timeout=300)
    text = log.read_text() if log.exists() else ""
    assert (final["JobState"], final["ExitCode"], final["Restarts"]) == ("FAILED", "2:0", "0"), (final, text[-4000:])
    starts = ("carbrand: job ", "launch/torchrun.sh: node ")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith(starts)]
    assert lines[0].startswith("carbrand train: error: unknown config key 'train.nope'"), text[-4000:]
    assert f"carbrand: job {job} ended with exit code 2" in text, text[-4000:]
    assert not run_dir.exists(), "a config error writes nothing"


def rendezvous_port(log: str) -> int:
    """The port in the batch script's topology line."""
    found = re.search(r"rendezvous c10d at [^ ]+:(\d+)", log)
    assert found, log[:2000]
    return int(found.group(1))


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["warning_signal", "requeue"])
def test_stopped_job_checkpoints_requeues_and_resumes(cluster, prepared_cars5, tmp_path, stop):
    """USR1 (what --signal=USR1@90 sends before the time limit) or an admin's requeue (SIGTERM to the whole job)."""
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    job = cluster.run(train_job("--parsable", prepared_cars5, run_dir, log, "train.epochs=3", "train.log_every=1"),
                      env=job_environment(cluster, processes_per_node=2), cwd=REPO).stdout.strip()
    wait_for_training(cluster, job, run_dir, log)
    assert_workers_bound_and_addressed(run_dir, world_size=4, cpus_per_task=2)
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


def assert_workers_bound_and_addressed(run_dir: Path, world_size: int, cpus_per_task: int) -> None:
    """Each rank of the running job (found by its output.dir) may use the task's CPUs and meets at the NodeAddr.

    Under task/affinity an srun task gets the CPUs its step asks for: without --cpus-per-task passed on, 1,
    which all ranks of a node and their loader threads would share. The ranks' MASTER_ADDR is what the
    rank-0 launcher published: its NodeAddr, not its host name (which a real cluster need not resolve).
    """
    workers = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            if f"output.dir={run_dir}" in (process.info["cmdline"] or []) and "RANK" in process.environ():
                workers[int(process.environ()["RANK"])] = process  # a loader's child shares its rank's CPUs and environment
        except psutil.Error:
            continue  # ended while we looked, or not ours to read
    assert sorted(workers) == list(range(world_size)), sorted(workers)
    # as many as the host has: task/affinity folds the test nodes' claimed CPUs onto the real ones
    expected = min(cpus_per_task, len(os.sched_getaffinity(0)))
    seen = {rank: (f"{len(worker.cpu_affinity())} CPU(s)", worker.environ().get("MASTER_ADDR")) for rank, worker in workers.items()}
    assert seen == {rank: (f"{expected} CPU(s)", NODE_ADDR) for rank in workers}, seen


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


# slurm/topology.sh alone: what the batch script resolves before any srun, in a second and without a cluster

FAKE_SCONTROL = """#!/usr/bin/env bash
# the two questions slurm/topology.sh asks, answered as for nodes n1 and n2 at 10.0.0.1 and 10.0.0.2
case "$1 $2" in
    "show hostnames") printf 'n1\\nn2\\n' ;;
    "-o show") echo "NodeName=$4 Arch=x86_64 NodeAddr=10.0.0.${4#n} NodeHostName=$4 State=ALLOCATED" ;;
    *) echo "fake scontrol: unexpected $*" >&2; exit 1 ;;
esac
"""


def resolve_topology(tmp_path: Path, **variables: str) -> dict[str, str]:
    """Source slurm/topology.sh as a 2-node job's batch script does; the variables it exports, and TOPOLOGY."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "MASTER_", "CARBRAND_", "OMP_", "NPROC_"))}
    env |= {"PATH": f"{bin_dir}:{env['PATH']}", "SLURM_JOB_ID": "34567", "SLURM_JOB_NODELIST": "n[1-2]",
            "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_ON_NODE": "8"} | variables
    names = ("MASTER_ADDR", "MASTER_PORT", "SRUN_CPUS_PER_TASK", "OMP_NUM_THREADS", "TOPOLOGY")
    script = "set -euo pipefail; source slurm/topology.sh; " + "; ".join(f'echo "{name}=${{{name}:-}}"' for name in names)
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines())


def test_topology_meets_at_the_first_nodes_address_whatever_the_submit_shell_exported(tmp_path):
    topology = resolve_topology(tmp_path, MASTER_ADDR=STALE_MASTER_ADDR)
    assert topology["MASTER_ADDR"] == "10.0.0.1", topology
    assert "rendezvous c10d at 10.0.0.1:" in topology["TOPOLOGY"]
    # an override on purpose has its own name
    assert resolve_topology(tmp_path, CARBRAND_MASTER_ADDR="10.1.2.3")["MASTER_ADDR"] == "10.1.2.3"


def test_topology_picks_a_free_port_outside_the_ephemeral_range_unless_given_one(tmp_path):
    low, high = ephemeral_ports()
    # job 34567: the old 20000 + id mod 20000 gave port 34567, in Linux's default ephemeral range 32768-60999
    port = int(resolve_topology(tmp_path)["MASTER_PORT"])
    assert not low <= port <= high, (port, (low, high))
    assert int(resolve_topology(tmp_path)["MASTER_PORT"]) == port  # a requeued job (same id) looks there first
    with socket.socket() as busy:  # another job's rendezvous on this node holds that port now
        busy.bind(("", port))
        busy.listen()
        other = int(resolve_topology(tmp_path)["MASTER_PORT"])
    assert other != port and not low <= other <= high, (port, other)
    assert resolve_topology(tmp_path, SLURM_JOB_ID="34568")["MASTER_PORT"] != str(port)  # the next job: another port
    assert resolve_topology(tmp_path, MASTER_PORT="29999")["MASTER_PORT"] == "29999"  # the user's choice wins


def test_the_tests_own_ports_follow_the_same_rule():
    """tests/helpers/ports.py: the rendezvous ports tests hand to launchers stay out of the ephemeral range too."""
    low, high = ephemeral_ports()
    ports = [free_port() for _ in range(20)]
    assert not any(low <= port <= high for port in ports), (ports, (low, high))
    assert len(set(ports)) > 15, "drawn at random, so that tests side by side do not pick the same"


def test_topology_passes_the_jobs_cpus_per_task_on_to_srun(tmp_path):
    # srun (SLURM >= 22.05) no longer reads the job's --cpus-per-task; SRUN_CPUS_PER_TASK is what it reads
    topology = resolve_topology(tmp_path, SLURM_CPUS_PER_TASK="4", NPROC_PER_NODE="2")
    assert topology["SRUN_CPUS_PER_TASK"] == "4", topology
    assert topology["OMP_NUM_THREADS"] == "2" and "4 CPU(s) per task" in topology["TOPOLOGY"]
    # no --cpus-per-task: srun's own default, and a stale SRUN_CPUS_PER_TASK from the submit shell is not the job's
    assert resolve_topology(tmp_path, SRUN_CPUS_PER_TASK="64")["SRUN_CPUS_PER_TASK"] == ""


def job_processes(job: str, node: str) -> list[psutil.Process]:
    """Every process of the job's tasks on `node` (launcher, torchrun, ranks), found by their SLURM environment."""
    found = []
    for process in psutil.process_iter():
        try:
            environ = process.environ()
        except psutil.Error:
            continue  # ended while we looked, or not ours to read
        if environ.get("SLURM_JOB_ID") == job and environ.get("SLURMD_NODENAME") == node:
            found.append(process)
    return found


def logged_train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()
            if line.endswith("}") and '"train/loss"' in line] if path.exists() else []


def newest_complete_checkpoint(run_dir: Path) -> int:
    return max(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*")
               if (p / "model.safetensors").is_file() and (p / "training_state.pt").is_file())


@pytest.mark.slow
def test_node_failure_requeues_the_job_which_resumes_from_the_newest_complete_checkpoint(cluster, prepared_cars5, tmp_path):
    """Node n2 dies mid-training: its slurmd and the job's processes there stop dead (SIGSTOP: no FIN, no RST, as a node
    losing power), SLURM marks it DOWN (what slurmctld does after SlurmdTimeout; done at once here), then the job's
    processes there are gone (SIGKILL) and its slurmd comes back (the node rebooted).

    SLURM requeues a batch job on a node failure when it may be requeued: `#SBATCH --requeue` in slurm/train.sbatch, or
    JobRequeue=1 in slurm.conf (the cluster's default for jobs without --requeue/--no-requeue; set in the test cluster).
    """
    run_dir, log, total = tmp_path / "run", tmp_path / "train.log", 6
    # 32 px, the loading in the training process: a short job, whose restarts cost little
    job = cluster.run(train_job("--parsable", prepared_cars5, run_dir, log, "data.image_size=32", "data.workers=0",
                                "data.loader=torchvision", f"train.max_steps={total}", "train.log_every=1",
                                "train.checkpoint_every_steps=2", "train.stop_deadline_s=3"),
                      env=job_environment(cluster, processes_per_node=1), cwd=REPO).stdout.strip()
    deadline = time.monotonic() + 300
    while not [step for step in logged_train_steps(run_dir) if step > 2]:  # checkpoint 2 complete, a step past it
        state = cluster.job_state(job)
        assert state.get("JobState") in ("PENDING", "RUNNING"), (state, log.read_text()[-4000:] if log.exists() else "")
        assert time.monotonic() < deadline, "no step past the first checkpoint in 300 s"
        time.sleep(0.1)
    tasks = job_processes(job, "n2")
    assert tasks, "no process of the job on n2"
    # the whole node: its slurmd and the job's slurmstepd there (the tasks' parent) stop too, or SLURM's clean-up
    # would wake the tasks (SIGCONT, SIGTERM) and they would stop gracefully, as no dead node can
    stepds = {task.parent() for task in tasks if task.parent() and task.parent().name().startswith("slurmstepd")}
    slurmd = psutil.Process(cluster.processes["slurmd-n2"].pid)
    dead = [slurmd, *stepds, *tasks]
    try:
        for process in dead:
            process.suspend()
        cluster.run(["scontrol", "update", "NodeName=n2", "State=DOWN", "Reason=carbrand-test-node-failure"])
        wait_for_requeue(cluster, job)
        kill_all([*stepds, *tasks])  # the node reboots: the job's processes there are gone, slurmd comes back
        psutil.wait_procs([*stepds, *tasks], timeout=30)
        slurmd.resume()
        deadline = time.monotonic() + 120  # the first node's share ends (SIGTERM, then the stop deadline)
        while job_processes(job, "n1") and time.monotonic() < deadline:
            time.sleep(0.2)
        newest = newest_complete_checkpoint(run_dir)
        failed_at = max(logged_train_steps(run_dir))
    finally:
        kill_all([*stepds, *tasks])
        slurmd.resume()
        cluster.run(["scontrol", "update", "NodeName=n2", "State=RESUME"], check=False)  # back after its reboot
    final = cluster.wait_for_end(job, timeout=600)
    text = log.read_text()
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", (final, text[-4000:])
    assert final["Restarts"] == "1", final
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{newest}'} at step {newest} (restart 1)" in text, text[-4000:]
    assert newest < failed_at < total, (newest, failed_at)

    records = read_metrics(run_dir)
    restart = next(i for i, r in enumerate(records) if r.get("run/restarts") == 1)
    before = [r["step"] for r in records[:restart] if "train/loss" in r]
    after = [r["step"] for r in records[restart:] if "train/loss" in r]
    assert before == list(range(1, failed_at + 1)), before  # nothing lost before the failure
    # the steps after the checkpoint are replayed, once, and nothing else: every step once more, none skipped
    assert after == list(range(newest + 1, total + 1)), after
    assert last_value(records, "run/restarts") == 1 and last_value(records, "run/ranks_agree") is True
    assert not (run_dir / "train.lock").exists(), "the lock is released at the end"
    assert (run_dir / "best" / "model.safetensors").is_file()


def kill_all(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.kill()  # also a stopped one
        except psutil.Error:
            pass  # already gone: SLURM's own clean-up got there first


def wait_for_requeue(cluster: SlurmCluster, job: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = cluster.job_state(job)
        if state.get("Restarts", "0") != "0" and state.get("JobState") in ("PENDING", "REQUEUED", "REQUEUE_HOLD"):
            return
        assert state.get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED"), f"ended instead of requeued: {state}"
        time.sleep(0.2)
    pytest.fail(f"job {job} was not requeued within {timeout} s of the node failure: {cluster.job_state(job)}")


# README promises about the SLURM defaults (issue 18): OMP_NUM_THREADS, the port rule, a time limit without warning.

@pytest.mark.parametrize(("variables", "threads"), [
    ({"SLURM_CPUS_PER_TASK": "12", "NPROC_PER_NODE": "3"}, "4"),
    ({"SLURM_CPUS_PER_TASK": "7", "NPROC_PER_NODE": "2"}, "3"),  # whole threads: rounded down
    ({"SLURM_CPUS_PER_TASK": "2", "NPROC_PER_NODE": "4"}, "1"),  # never below one
    ({"SLURM_CPUS_PER_TASK": "24", "SLURM_GPUS_ON_NODE": "4"}, "6"),  # one process per GPU
], ids=["12-cpus-3-processes", "7-cpus-2-processes", "2-cpus-4-processes", "24-cpus-4-gpus"])
def test_omp_threads_are_the_cpus_per_task_shared_by_the_nodes_processes(tmp_path, variables, threads):
    topology = resolve_topology(tmp_path, **variables)
    assert topology["OMP_NUM_THREADS"] == threads, topology
    assert f"OMP_NUM_THREADS={threads}," in topology["TOPOLOGY"]


def test_rendezvous_ports_start_at_20000_outside_the_ephemeral_range_one_per_job_id(tmp_path):
    low, high = ephemeral_ports()
    job_ids = [str(1_000_003 + 7_919 * k) for k in range(8)]
    ports = {job: int(resolve_topology(tmp_path, SLURM_JOB_ID=job)["MASTER_PORT"]) for job in job_ids}
    assert all(20000 <= port <= 65535 and not low <= port <= high for port in ports.values()), (ports, (low, high))
    assert len(set(ports.values())) == len(job_ids), f"jobs starting together look at the same port first: {ports}"


@pytest.mark.slow
def test_time_limit_without_the_warning_signal_ends_as_timeout_after_a_checkpoint(cluster, prepared_cars5, tmp_path):
    """No SIGUSR1 before the limit (--signal overridden): at the limit SLURM sends SIGTERM to every process of
    the job, the ranks checkpoint within KillWait, the job ends as TIMEOUT and is not requeued.

    The limit is reached without waiting minutes: once the job trains, its limit is cut to 0 (an administrator's
    `scontrol update TimeLimit`), which puts its end time in the past; slurmctld ends it at its next time-limit
    check (every 30 s) through the same path as any job that runs out of time."""
    script = tmp_path / "train_without_warning.sbatch"  # slurm/train.sbatch as a site might override it
    lines = (REPO / "slurm" / "train.sbatch").read_text().splitlines(keepends=True)
    assert sum(line.startswith("#SBATCH --signal=") for line in lines) == 1
    script.write_text("".join(line for line in lines if not line.startswith("#SBATCH --signal=")))
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    job = cluster.run(["sbatch", "--parsable", "-N", "1", "--time=10", "--cpus-per-task=2", f"--output={log}", str(script),
                       str(CPU_RECIPE), f"data.manifest={prepared_cars5}", f"output.dir={run_dir}", "data.image_size=32",
                       "data.workers=0", "train.epochs=1000", "train.log_every=1"],
                      env=job_environment(cluster, processes_per_node=1), cwd=REPO).stdout.strip()
    wait_for_training(cluster, job, run_dir, log)
    cluster.run(["scontrol", "update", f"JobId={job}", "TimeLimit=0"])
    final = cluster.wait_for_end(job, timeout=300)
    text = log.read_text() if log.exists() else ""
    assert final["JobState"] == "TIMEOUT" and final["Restarts"] == "0", (final, text[-4000:])
    assert "requeueing" not in text
    stops = [r for r in read_metrics(run_dir) if "run/ranks_signalled" in r]
    assert len(stops) == 1 and stops[0]["run/stop_signal"] == signal.SIGTERM, text[-4000:]
    stopped_at = stops[0]["step"]
    checkpoint = run_dir / "checkpoints" / f"step_{stopped_at}"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "training_state.pt").is_file(), text[-4000:]
    assert (run_dir / "last").resolve() == checkpoint.resolve()
    assert f"checkpoint saved at step {stopped_at}" in text
