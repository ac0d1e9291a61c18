"""One writer per run directory (carbrand/training/run_lock.py): a second training stops before it writes anything,
a lock left by a dead process or by the same SLURM job before its requeue is taken over, one from another
host only with --force-unlock; two processes taking over a stale lock at once cannot both win.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from carbrand.training.run_lock import LOCK_FILE, LockHolder, RunDirLock, RunDirLocked, process_start_ticks
from tests.helpers.fault_runs import error_line, logged_steps, start_training, tree, wait_until
from tests.helpers.paths import REPO
from tests.helpers.subprocesses import subprocess_environment

RUN = ("data.loader=torchvision", "train.log_every=1", "train.checkpoint_every_steps=2")


@pytest.mark.slow
def test_second_training_stops_before_writing_and_a_dead_holders_lock_is_taken_over(prepared_cars5, tmp_path):
    run_dir = tmp_path / "run"
    first = start_training(prepared_cars5, run_dir, *RUN, "train.max_steps=40", logs=tmp_path / "first")
    try:
        wait_until(lambda: logged_steps(run_dir), first, what="the first training's first step")
        os.kill(first.process.pid, signal.SIGSTOP)  # it writes nothing while the second one tries
        recorded = json.loads((run_dir / LOCK_FILE).read_text())
        assert (recorded["host"], recorded["pid"]) == (socket.gethostname(), first.process.pid), recorded
        assert recorded["started"] and recorded["slurm_job_id"] is None, recorded

        before = tree(run_dir)
        second = start_training(prepared_cars5, run_dir, *RUN, "train.max_steps=2", logs=tmp_path / "second")
        assert second.wait(timeout=300) == 1, second.stderr[-3000:]
        line = error_line(second.stderr)
        assert line.startswith(f"carbrand train: error: {run_dir} is in use by another training (host "
                               f"{socket.gethostname()}, pid {first.process.pid}, started {recorded['started']}; "
                               f"lock file {run_dir / LOCK_FILE})"), line
        assert "--force-unlock" in line
        assert second.stderr.strip() == line and second.stdout == "", "one line, before anything else"
        assert tree(run_dir) == before, "the second training wrote into the run directory"
    finally:
        first.kill()  # kill -9 (also when stopped): the lock stays behind, its pid gone

    assert (run_dir / LOCK_FILE).is_file()
    third = start_training(prepared_cars5, run_dir, *RUN, "train.max_steps=2", logs=tmp_path / "third")
    assert third.wait(timeout=300) == 0, third.stderr[-3000:]
    warnings = [line for line in third.stderr.splitlines() if "warning" in line]
    assert warnings == [f"carbrand: warning: took over the lock of {run_dir} from host {socket.gethostname()}, "
                        f"pid {first.process.pid}, started {recorded['started']} (its process is gone)"], warnings
    assert not (run_dir / LOCK_FILE).exists(), "released at the end"
    assert not [p for p in run_dir.iterdir() if p.name.startswith(f".{LOCK_FILE}")], "no private lock file left"


def write_lock(run_dir: Path, holder: LockHolder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps(asdict(holder)))


def holder_for(pid: int, **changes) -> LockHolder:
    holder = LockHolder.this_process()
    return replace(holder, **({"pid": pid, "process_start": process_start_ticks(pid), "token": "theirs"} | changes))


@pytest.fixture
def live_process():
    process = subprocess.Popen(["sleep", "120"])
    yield process
    process.kill()
    process.wait()


def test_lock_rules_against_live_dead_foreign_and_requeued_holders(tmp_path, live_process, monkeypatch, capsys):
    for name in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    run_dir = tmp_path / "run"
    live = holder_for(live_process.pid)
    write_lock(run_dir, live)
    with pytest.raises(RunDirLocked, match=rf"pid {live_process.pid}, started .*--force-unlock"):
        RunDirLock(run_dir).acquire()

    # the same pid, now another process (the pid was reused): the holder is gone
    write_lock(run_dir, replace(live, process_start="1"))
    lock = RunDirLock(run_dir)
    lock.acquire()
    assert "(its process is gone)" in capsys.readouterr().err
    lock.release()
    assert not (run_dir / LOCK_FILE).exists()

    # another host: its pid means nothing here; only --force-unlock takes it over
    foreign = replace(live, host="gpu-node-17", pid=4242)
    write_lock(run_dir, foreign)
    with pytest.raises(RunDirLocked, match="host gpu-node-17, pid 4242"):
        RunDirLock(run_dir).acquire()
    forced = RunDirLock(run_dir, force=True)
    forced.acquire()
    said = capsys.readouterr().err
    assert "from host gpu-node-17, pid 4242" in said and said.rstrip().endswith("(--force-unlock)"), said
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    # a release after someone forced the lock away from us leaves theirs alone
    write_lock(run_dir, foreign)
    forced.release()
    assert json.loads((run_dir / LOCK_FILE).read_text())["host"] == "gpu-node-17"

    # a lock that cannot be read: named, and taken over only when told
    (run_dir / LOCK_FILE).write_text("{half a record")
    with pytest.raises(RunDirLocked, match=f"lock file {run_dir / LOCK_FILE} cannot be read .*--force-unlock"):
        RunDirLock(run_dir).acquire()
    forced = RunDirLock(run_dir, force=True)
    forced.acquire()
    forced.release()

    # SLURM: the same job on another host, requeued (restart 1 after 0), takes over its own lock
    monkeypatch.setenv("SLURM_JOB_ID", "7001234")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_lock(run_dir, replace(foreign, slurm_job_id="7001234", slurm_restart_count="1"))
    with pytest.raises(RunDirLocked, match="SLURM job 7001234"):  # the same restart: another step of the job
        RunDirLock(run_dir).acquire()
    write_lock(run_dir, replace(foreign, slurm_job_id="7001234", slurm_restart_count="0"))
    requeued = RunDirLock(run_dir)
    requeued.acquire()
    assert "(the same SLURM job, requeued (restart 1))" in capsys.readouterr().err
    assert json.loads((run_dir / LOCK_FILE).read_text())["slurm_job_id"] == "7001234"
    requeued.release()


RACER = """
import sys, time
from pathlib import Path
from carbrand.training.run_lock import RunDirLock, RunDirLocked
lock = RunDirLock(Path(sys.argv[1]))
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all try at once
try:
    lock.acquire()
    print("won", flush=True)
    time.sleep(4)  # held while the others try
    lock.release()
except RunDirLocked as error:
    print("lost", flush=True)
"""


def test_processes_taking_over_a_stale_lock_at_once_only_one_wins(tmp_path):
    import time

    run_dir = tmp_path / "run"
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_lock(run_dir, holder_for(dead.pid, process_start="1"))
    start_at = str(time.time() + 3)  # after every racer has started, even on a busy machine
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(run_dir), start_at], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO, env=subprocess_environment())
              for _ in range(6)]
    outcomes = [racer.communicate(timeout=60) for racer in racers]
    results = sorted(out.strip() for out, _ in outcomes)
    assert results == ["lost"] * 5 + ["won"], outcomes
    assert not (run_dir / LOCK_FILE).exists() and list(run_dir.iterdir()) == []


def test_a_holder_running_as_another_user_is_alive_and_keeps_its_lock(tmp_path, live_process, monkeypatch):
    """Run as root, the suite never sees os.kill(pid, 0) refuse: inject it. That refusal means the pid exists."""
    for name in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    run_dir = tmp_path / "run"
    holder = holder_for(live_process.pid)  # its recorded start time is the live process's: not a reused pid
    write_lock(run_dir, holder)

    def another_users_process(pid, signal_number):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("carbrand.training.run_lock.os.kill", another_users_process)
    with pytest.raises(RunDirLocked) as refused:
        RunDirLock(run_dir).acquire()
    message = str(refused.value)
    assert "\n" not in message and f"lock file {run_dir / LOCK_FILE}" in message, message
    assert f"host {holder.host}, pid {live_process.pid}, started {holder.started}" in message, message
    assert json.loads((run_dir / LOCK_FILE).read_text())["token"] == "theirs", "the lock was taken over"

    # the pid refuses the signal but started at another time: another user's process reusing a dead holder's pid
    write_lock(run_dir, replace(holder, process_start="1"))
    lock = RunDirLock(run_dir)
    lock.acquire()
    lock.release()
