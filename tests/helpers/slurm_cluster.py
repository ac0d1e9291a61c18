"""A real two-node SLURM cluster on this host, for the SLURM tests (Debian's slurm-wlm 22.05 + munge).

    cluster = SlurmCluster.start(workdir)   # munged, slurmctld, slurmd -N n1, slurmd -N n2; both nodes idle
    cluster.run(["sbatch", "--wait", ...])   # clients see it through SLURM_CONF in cluster.env
    cluster.stop()                          # cancel jobs, then stop the daemons by PID

No systemd, no cgroups: processes are tracked by parentage (proctrack/linuxproc), and both
slurmd listen on 127.0.0.1 under their own ports. Tasks are bound to CPUs as on many sites:
task/affinity (sched_setaffinity, no cgroup needed) with autobind=cores, so a task gets the
CPUs its step asked for (srun --cpus-per-task, 1 unless given) and a launcher that forgets to
pass them on shows. Job ids start at a random large number, as on a cluster that has run for
years, and differ between clusters started side by side on one host.
Stale daemons from an earlier run must not answer readiness checks for ours: every
cluster gets fresh ports and its own slurm.conf and munge socket, start-up refuses a busy
controller port, and every daemon's PID must stay alive while we wait and while tests run.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.ports import consecutive_free_ports, free_port, port_in_use

NODES = ("n1", "n2")
# claimed, not real: SlurmdParameters=config_overrides lets a 2-core host run 2 x 4, and task/affinity
# folds CPU numbers beyond the host's onto the real ones
CPUS_PER_NODE = 4
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
MUNGE_KEY = Path("/etc/munge/munge.key")
# A job in one of these states is over; a requeued one goes back to PENDING (same job id).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
REQUEUE_SETTLE_S = 5  # after a requeue, wait this long (and for idle nodes) before lifting the hold
INSTALL_HINT = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge (tests/run.sh does it)"


class ClusterError(RuntimeError):
    pass


def program(name: str) -> str | None:
    """Full path: the daemons live in /usr/sbin, which a non-login PATH may lack."""
    return shutil.which(name) or (str(Path("/usr/sbin", name)) if Path("/usr/sbin", name).exists() else None)


def missing_programs() -> list[str]:
    return [name for name in PROGRAMS if program(name) is None]


def first_job_id() -> int:
    """A 7-digit id as on a cluster that has run for years, random so that side-by-side clusters differ.

    Chosen so that the old rendezvous port, 20000 + id mod 20000, would be 33000-37000: inside Linux's
    default ephemeral range (32768-60999), where slurm/topology.sh must no longer put it.
    """
    return 20000 * random.randint(50, 499) + random.randint(13000, 17000)


def slurm_conf(workdir: Path, controller_port: int, node_ports: list[int], munge_socket: Path) -> str:
    host = socket.gethostname()
    first, last = node_ports[0], node_ports[-1]
    assert last - first == len(node_ports) - 1, "node ports must be consecutive"
    return f"""\
ClusterName=carbrandtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={controller_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={workdir}/state
SlurmdSpoolDir={workdir}/spool/%n
SlurmctldPidFile={workdir}/slurmctld.pid
SlurmdPidFile={workdir}/slurmd.%n.pid
SlurmctldLogFile={workdir}/slurmctld.log
SlurmdLogFile={workdir}/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
TaskPluginParam=autobind=cores
FirstJobId={first_job_id()}
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=5
KillWait=30
JobRequeue=1
NodeName=n[1-{len(NODES)}] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[{first}-{last}] CPUs={CPUS_PER_NODE} State=UNKNOWN
PartitionName=debug Nodes=n[1-{len(NODES)}] Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    workdir: Path
    munge_dir: Path
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @classmethod
    def start(cls, workdir: Path, timeout: float = 60) -> SlurmCluster:
        missing = missing_programs()
        if missing:
            raise ClusterError(f"SLURM test cluster: {', '.join(missing)} not installed; {INSTALL_HINT}")
        if os.geteuid() != 0:
            raise ClusterError("SLURM test cluster: needs root (SlurmUser=root, munged started as the munge user)")
        if not MUNGE_KEY.is_file():
            raise ClusterError(f"SLURM test cluster: {MUNGE_KEY} missing (the munge package creates it; or run mungekey)")
        workdir = Path(workdir).resolve()
        controller_port = free_port()
        if port_in_use(controller_port):
            raise ClusterError(f"SLURM test cluster: controller port {controller_port} is busy (a stale slurmctld?)")
        node_ports = consecutive_free_ports(len(NODES))
        for name in ("state", *(f"spool/{node}" for node in NODES)):
            (workdir / name).mkdir(parents=True, exist_ok=True)
        # munged checks that its socket directory belongs to the munge user and is reachable by it:
        # the pytest temp tree is root-only (0700), so the socket lives in its own folder under /tmp.
        munge_dir = Path(tempfile.mkdtemp(prefix="carbrand-munge-"))
        shutil.chown(munge_dir, "munge", "munge")
        munge_dir.chmod(0o755)
        conf = workdir / "slurm.conf"
        conf.write_text(slurm_conf(workdir, controller_port, node_ports, munge_dir / "munge.socket"))
        env = dict(os.environ, SLURM_CONF=str(conf))
        cluster = cls(workdir=workdir, munge_dir=munge_dir, env=env)
        try:
            cluster._start_daemons(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start_daemons(self, timeout: float) -> None:
        socket_path = self.munge_dir / "munge.socket"
        self._spawn("munged", ["munged", "--foreground", f"--socket={socket_path}",
                               f"--pid-file={self.munge_dir}/munged.pid", f"--log-file={self.munge_dir}/munged.log",
                               f"--seed-file={self.munge_dir}/munged.seed"], user="munge")
        self._wait_for(lambda: socket_path.exists(), "munged socket", timeout)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])  # -i: ignore state left by an earlier run
        self._wait_for(lambda: "UP" in self.run(["scontrol", "ping"], check=False).stdout, "slurmctld", timeout)
        for node in NODES:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node])
        self._wait_for(self._nodes_idle, "both nodes idle", timeout)

    def _spawn(self, name: str, command: list[str], user: str | None = None) -> None:
        log = (self.workdir / f"{name}.stdout").open("ab")
        # own session: a Ctrl-C meant for pytest reaches the daemons only through stop()
        self.processes[name] = subprocess.Popen([program(command[0]), *command[1:]], stdout=log, stderr=subprocess.STDOUT,
                                                env=self.env, user=user, start_new_session=True)

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise ClusterError(f"SLURM test cluster: {name} exited with {process.returncode}; "
                                   f"logs in {self.workdir} and {self.munge_dir}")

    def _wait_for(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if ready():
                return
            time.sleep(0.1)
        raise ClusterError(f"SLURM test cluster: {what} not ready after {timeout:.0f} s; logs in {self.workdir}")

    def _nodes_idle(self) -> bool:
        states = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
        return sorted(states[0::2]) == sorted(NODES) and set(states[1::2]) == {"idle"}

    def run(self, command: list[str], check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(command, capture_output=True, text=True, env=kwargs.pop("env", self.env),
                                timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise ClusterError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def job_state(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict ({} once the job has left the controller, MinJobAge after its end)."""
        result = self.run(["scontrol", "-o", "show", "job", job_id], check=False)
        if result.returncode != 0:
            return {}
        return dict(item.split("=", 1) for item in result.stdout.split() if "=" in item)

    def wait_for_end(self, job_id: str, timeout: float) -> dict[str, str]:
        """Poll until the job is over for good, through any requeues; returns its last `scontrol show job`.

        SLURM holds a requeued job back for about two minutes (Reason=BeginTime) so that its
        nodes can be cleaned up. Here the hold is lifted as soon as every node is idle again and
        a few seconds have passed: lifted any earlier, the relaunch can meet the old instance's
        revoked credential on a node still tearing it down, and the job fails ("Job credential
        revoked"), which real clusters never see because of that hold.
        """
        deadline, seen, held_since = time.monotonic() + timeout, {}, None
        while time.monotonic() < deadline:
            self._check_alive()
            state = self.job_state(job_id)
            if not state:
                raise ClusterError(f"job {job_id} left the controller before its end was seen (last: {seen})")
            if state["JobState"] in FINAL_STATES:
                time.sleep(1)  # a requeue in progress must not pass for the end: look again
                again = self.job_state(job_id)
                if again.get("JobState", state["JobState"]) in FINAL_STATES:
                    return again or state
            elif state["JobState"] == "PENDING" and state.get("Reason") == "BeginTime" and state.get("Restarts", "0") != "0":
                held_since = held_since or time.monotonic()
                node_states = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.split()
                if time.monotonic() - held_since > REQUEUE_SETTLE_S and node_states and set(node_states) == {"idle"}:
                    self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
                    held_since = None
            seen = state
            time.sleep(0.25)
        raise ClusterError(f"job {job_id} still {seen.get('JobState')} after {timeout:.0f} s")

    def stop(self) -> None:
        """Cancel every job and wait for the nodes to drain, then stop the daemons by PID (never by name)."""
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            self.run(["scancel", "--partition=debug"], check=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.2)
        for name in [f"slurmd-{node}" for node in NODES] + ["slurmctld", "munged"]:
            process = self.processes.get(name)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.munge_dir, ignore_errors=True)
