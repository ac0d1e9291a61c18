"""One writer per run directory: rank 0 holds `output.dir/train.lock` while a training runs.

Two trainings writing one run directory resume from each other's checkpoints and overwrite
each other's `best/`: the second one must stop before it writes anything. The lock file is
created atomically, also on a shared (NFS, Lustre, GPFS) file system: written whole under a
name of its own, then hard-linked to `train.lock`, which fails if the name exists. It records
who holds it (host, pid, SLURM job id and restart count, start time), so that:

- a lock of a process that is gone (same host, pid no longer running, or the host rebooted)
  is taken over with a warning;
- a requeued SLURM job (same job id, another restart count) takes over its own lock;
- a lock from another host that cannot be checked from here is taken over only with
  `--force-unlock` (the error message says so);
- anything else stops the second training with one line naming the holder (exit code 1).

A takeover renames the old lock aside and checks it is the one it judged before deleting it,
so two processes taking over at once cannot both win. The lock is released (deleted, if it is
still ours) when the training ends; a crash or kill -9 leaves it, and the next start takes it
over as above.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate.utils import broadcast_object_list

from carbrand.checkpoint import find_resume_checkpoint, recover_run_dir_after_crash
from carbrand.errors import CarbrandError

LOCK_FILE = "train.lock"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class RunDirLocked(CarbrandError):
    """Another training holds the run directory. Exit code 1."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds the lock: what lets the next start judge whether that process is still there."""

    host: str
    pid: int
    started: str  # UTC, ISO 8601
    slurm_job_id: str | None = None
    slurm_restart_count: str | None = None
    boot_id: str | None = None  # changes when the host reboots: its old pids mean nothing
    process_start: str | None = None  # the pid's start time in clock ticks: a reused pid has another
    token: str = ""  # unique per acquisition: a release deletes only its own lock

    @classmethod
    def this_process(cls) -> LockHolder:
        return cls(host=socket.gethostname(), pid=os.getpid(),
                   started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   slurm_job_id=os.environ.get("SLURM_JOB_ID") or None,
                   slurm_restart_count=os.environ.get("SLURM_RESTART_COUNT", "0") if os.environ.get("SLURM_JOB_ID") else None,
                   boot_id=_read(BOOT_ID), process_start=process_start_ticks(os.getpid()), token=uuid.uuid4().hex)

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"host {self.host}, pid {self.pid}{job}, started {self.started}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def process_start_ticks(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (after the parenthesised command name, which may hold spaces)."""
    stat = _read(Path(f"/proc/{pid}/stat"))
    return stat.rsplit(")", 1)[1].split()[19] if stat else None


def process_alive(holder: LockHolder) -> bool:
    """Only meaningful on the holder's host: is its process still the one running under that pid?"""
    if holder.boot_id and holder.boot_id != _read(BOOT_ID):
        return False  # the host rebooted since
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The pid runs as another user (a colleague's training in a shared output.dir): it exists.
        # Taking the lock over here would let two trainings write one run directory, so only the
        # start time below (readable in /proc whatever the owner) may still prove it a reused pid.
        pass
    current = process_start_ticks(holder.pid)
    return not (holder.process_start and current and current != holder.process_start)  # else a reused pid


def takeover_reason(holder: LockHolder, me: LockHolder, force: bool) -> str | None:
    """Why `me` may take over `holder`'s lock, or None when it must not."""
    if me.slurm_job_id and holder.slurm_job_id == me.slurm_job_id and holder.slurm_restart_count != me.slurm_restart_count:
        return f"the same SLURM job, requeued (restart {me.slurm_restart_count})"
    if holder.host == me.host and not process_alive(holder):
        return "its process is gone"
    if force:
        return "--force-unlock"
    return None


def read_holder(path: Path) -> LockHolder | None:
    """The holder recorded in `path`; None if the file is gone. A lock that cannot be read is an error."""
    try:
        return LockHolder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as error:
        raise RunDirLocked(f"lock file {path} cannot be read ({type(error).__name__}); if no training uses "
                           f"{path.parent}, start again with --force-unlock") from None


def _create(path: Path, me: LockHolder) -> bool:
    """Write the record under a private name, then link it to `path`: True if we made it, False if it existed."""
    private = path.with_name(f".{path.name}.{me.host}.{me.pid}")
    with private.open("w") as handle:
        handle.write(json.dumps(asdict(me)) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(private, path)  # atomic and exclusive, also over NFS (unlike O_EXCL on old NFS clients)
        return True
    except FileExistsError:
        return False
    except OSError:
        # NFS may report a failure for a link that was made (a lost reply): the link count tells
        if private.stat().st_nlink == 2:
            return True
        raise
    finally:
        private.unlink(missing_ok=True)


def _remove_if_still(path: Path, judged: LockHolder, me: LockHolder) -> bool:
    """Delete `path` if it is still the lock we judged stale; put back a lock someone took meanwhile."""
    aside = path.with_name(f".{path.name}.stale.{me.host}.{me.pid}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False  # someone else removed it first: try again from the start
    try:
        try:
            token = json.loads(aside.read_text()).get("token")
        except (ValueError, AttributeError):
            token = None  # not the record we judged
        if token == judged.token:
            return True
        try:
            os.link(aside, path)  # another process's fresh lock: give it back
        except FileExistsError:
            pass
        return False
    finally:
        aside.unlink(missing_ok=True)


@dataclass
class RunDirLock:
    """`acquire` on rank 0 before the run directory is written to; `release` when the training ends."""

    run_dir: Path
    force: bool = False
    holder: LockHolder | None = None  # set while we hold it

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_FILE

    def acquire(self) -> None:
        """Take the lock, taking over a stale one with a warning; RunDirLocked names a live holder."""
        try:
            self._acquire(LockHolder.this_process())
        except OSError as error:  # the same line as check_run_dir_writable's: the lock is the first write
            raise CarbrandError(f"run directory {self.run_dir} is not writable ({error.strerror or error}); "
                                f"set output.dir to a writable directory") from None

    def _acquire(self, me: LockHolder) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # each round: another process took or released the lock while we looked
            try:
                holder = read_holder(self.path)  # first only read: a refused start writes nothing at all
            except RunDirLocked:
                if not self.force:
                    raise
                self.path.unlink(missing_ok=True)  # unreadable, and the user says nobody holds it
                continue
            if holder is None:
                if _create(self.path, me):
                    self.holder = me
                    return
                continue
            reason = takeover_reason(holder, me, self.force)
            if reason is None:
                raise RunDirLocked(
                    f"{self.run_dir} is in use by another training ({holder.describe()}; lock file {self.path}): "
                    f"two trainings in one output.dir overwrite each other's checkpoints; use another output.dir, "
                    f"or, if that training is gone (its host down), start again with --force-unlock")
            if _remove_if_still(self.path, holder, me):
                print(f"carbrand: warning: took over the lock of {self.run_dir} from {holder.describe()} ({reason})",
                      file=sys.stderr, flush=True)
        raise RunDirLocked(f"{self.path}: other processes kept taking the lock; is another training starting there?")

    def release(self) -> None:
        """Delete the lock if it is still ours (after a --force-unlock elsewhere it is not)."""
        if self.holder is None:
            return
        try:
            current = read_holder(self.path)
        except RunDirLocked:
            current = None
        if current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)
        self.holder = None


def lock_run_dir(accelerator, lock: RunDirLock, resume: str, resumed_from: Path | None) -> None:
    """Rank 0 takes the lock; every rank gets its answer (or its error), so none writes or waits alone.

    Called after the resume checkpoint was picked and read, before the first write (a bad input
    still writes nothing). Under the lock, rank 0 checks that the pick is still the newest
    complete checkpoint: a newer one means the stale lock's owner was still saving while we
    picked; resuming from the older one would silently drop its steps. Then it puts back a best/
    that a save killed mid-swap left aside and removes that save's temporaries.
    """

    answer: list = [None]
    if accelerator.is_main_process:
        try:
            lock.acquire()
            newest = find_resume_checkpoint(lock.run_dir, resume) if resume == "auto" else resumed_from
            if newest != resumed_from:
                lock.release()
                raise RunDirLocked(f"{newest} appeared while this training started (the previous one was still "
                                   f"saving); start again to resume from it")
            recover_run_dir_after_crash(lock.run_dir)  # only the lock holder may move a dead writer's leftovers
        except CarbrandError as error:
            answer = [error]
    if accelerator.num_processes > 1:
        broadcast_object_list(answer, from_process=0)
    if isinstance(answer[0], CarbrandError):
        raise answer[0]
