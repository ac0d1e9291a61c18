"""torchrun for one node, except that SIGUSR1 and SIGTERM reach every worker and never stop torchrun itself.

    python launch/torchrun_forward_signals.py --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint 10.0.0.1:29500 --rdzv-id job42 carbrand/train.py --config configs/stanford_cars.yaml
    (launch/torchrun.sh builds this command from NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE,
    LOCAL_ADDR)

Arguments are torchrun's. Why not plain torchrun: it does not forward SIGUSR1 (SLURM's
time-limit warning) to its workers, and SIGUSR1's default action kills torchrun itself,
which ends the step; on SIGTERM it terminates the workers and SIGKILLs them 30 s later,
saved or not. The trainer turns either signal into "all ranks checkpoint at the next step
boundary, then exit 143", so this launcher only has to make every worker hear it:
  - it catches both signals and sends them on to each worker (its direct children, each
    in a session of its own, so no process-group signal reaches them);
  - SIGUSR1 would kill a worker that does not catch it yet (still importing), so such a
    worker gets it once it does, checked every 0.2 s; SIGTERM goes to every worker at once
    (a worker without a handler, e.g. the evaluator, simply ends, as SIGTERM asks);
  - torchrun is told to leave SIGTERM alone (its SIGINT, SIGHUP and SIGQUIT handling stays).
Exit code 143 when the workers stopped on request (so a batch script can requeue); when a worker
failed, the exit code of the first one that exited on its own (carbrand's 2 for a config error,
1 for other errors), or else 128 + the signal that killed one, as a shell says; plain torchrun
says 1. A lost rendezvous store (node 0's launcher ended) is one line and exit code 1, not torch's
traceback.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

FORWARDED = (signal.SIGUSR1, signal.SIGTERM)
EXIT_CODE_PREEMPTED = 143  # the trainer's exit code after a requested stop
RETRY_SECONDS = 0.2


def child_pids(parent: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # the command name may hold spaces and ')'
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def catches(pid: int, number: int) -> bool:
    """Whether `pid` has a handler for signal `number` (SigCgt in /proc/PID/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (number - 1) & 1)
    except OSError:
        pass
    return False


class Forwarder:
    """Remembers the stop signal and delivers it to every worker that can take it, until torchrun ends."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.delivered: set[int] = set()
        self.wake = threading.Event()
        self.done = threading.Event()

    def handle(self, number: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.received = number
        self.delivered.clear()  # a second signal goes to everyone again
        self.wake.set()

    def run(self) -> None:
        while not self.done.is_set():
            self.wake.wait(RETRY_SECONDS)
            self.wake.clear()
            if self.received is not None:
                self.deliver(self.received)

    def deliver(self, number: int) -> None:
        for pid in child_pids(os.getpid()):
            if pid not in self.delivered and (number == signal.SIGTERM or catches(pid, number)):
                try:
                    os.kill(pid, number)
                    self.delivered.add(pid)
                except ProcessLookupError:
                    pass


def main(argv: list[str]) -> int:
    forwarder = Forwarder()
    for number in FORWARDED:  # before importing torch, which takes seconds
        signal.signal(number, forwarder.handle)
    threading.Thread(target=forwarder.run, name="forward-signals", daemon=True).start()
    # Leave SIGTERM to us. Older torch reads the list from TORCHELASTIC_SIGNALS_TO_HANDLE; newer
    # torchrun overwrites that from --signals-to-handle, whose default is PET_SIGNALS_TO_HANDLE.
    for name in ("TORCHELASTIC_SIGNALS_TO_HANDLE", "PET_SIGNALS_TO_HANDLE"):
        os.environ[name] = "SIGINT,SIGHUP,SIGQUIT"
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    try:
        # torchrun's `main` without its @record, whose only work here would be an error log line saying that
        # this launcher has no error file of its own to copy the failed worker's into
        run(args)
        return 0
    except ChildFailedError as error:
        return failed_exit_code(error, stop_requested=forwarder.received is not None)
    except RendezvousConnectionError as error:
        # The launcher serving the rendezvous store (node 0's) is gone, e.g. its rank died and it exited: one
        # line pointing there, not torch's chained traceback, which says only that a socket closed
        print(f"launch/torchrun.sh: lost the rendezvous store at {args.rdzv_endpoint} ({store_failure(error)}); "
              f"the launcher serving it (node 0's) ended or is out of reach: its log says why", file=sys.stderr)
        return 1
    finally:
        forwarder.done.set()


def store_failure(error: BaseException) -> str:
    """The first line of the socket error under torch's RendezvousConnectionError ("See inner exception")."""
    cause = error.__cause__ or error
    lines = str(cause).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(cause).__name__


def failed_exit_code(error, stop_requested: bool) -> int:
    """What the launcher exits with when workers failed: 143 after a requested stop, else a worker's own code.

    A worker killed by a signal is most often one that torchrun stopped because another had failed
    (SIGTERM, which must not read as 143, "requeue me"), so the code of the first worker that exited on
    its own comes first (torchrun times each failure; carbrand's workers write theirs); 128 + the signal
    only when every failed worker was killed.
    """
    codes = {failure.exitcode for failure in error.failures.values()}
    if codes == {EXIT_CODE_PREEMPTED} or stop_requested:
        return EXIT_CODE_PREEMPTED
    failures = sorted(error.failures.values(), key=lambda failure: failure.timestamp)
    own_codes = [failure.exitcode for failure in failures if failure.exitcode > 0]
    return own_codes[0] if own_codes else 128 - failures[0].exitcode  # exit code -N: killed by signal N


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
