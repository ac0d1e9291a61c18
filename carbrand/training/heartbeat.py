"""Which ranks are still alive: named in the error when a collective fails, instead of a stack trace blaming no one.

Every rank bumps its own counter in the rendezvous store once a second from a daemon
thread. The store is the TCPStore at MASTER_ADDR:MASTER_PORT that `accelerate launch`,
torchrun (the agent's store) and srun-style env:// start-up (rank 0's store) already run.
When a collective fails (a peer's connection reset) or times out (`train.collective_timeout_s`),
the ranks whose counter stopped moving are the dead or frozen ones. A thread keeps beating
while its own rank waits inside a collective (the wait releases the GIL), so a survivor
stuck behind the dead rank is never mistaken for it.
"""

from __future__ import annotations

import datetime
import os
import threading
import time

import torch.distributed as dist

KEY = "carbrand.heartbeat.{rank}"  # a c10d store key, not a path


class Heartbeat:
    def __init__(self, rank: int, world_size: int, interval_s: float = 1.0):
        self.rank, self.world_size, self.interval_s = rank, world_size, interval_s
        self.address = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        self._store = None
        self._stop = threading.Event()
        self._thread = None
        if world_size < 2 or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            return
        try:  # a client of its own: the process group's connection stays untouched
            self._store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                        timeout=datetime.timedelta(seconds=5), wait_for_workers=False)
        except Exception:  # no store reachable: errors will not name ranks, training is unaffected
            return
        self._thread = threading.Thread(target=self._beat, name="carbrand-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while True:
            try:
                self._store.add(KEY.format(rank=self.rank), 1)
            except Exception:
                return  # the store is gone; silent_ranks() reports that
            if self._stop.wait(self.interval_s):
                return

    def silent_ranks(self) -> list[int] | None:
        """Other ranks whose heartbeat did not move for 3 intervals (dead or frozen); None if that cannot be told."""
        if self._store is None:
            return None
        keys = [KEY.format(rank=r) for r in range(self.world_size)]
        before = [self._store.add(key, 0) for key in keys]  # add(0) reads without blocking on a missing key
        time.sleep(3 * self.interval_s)
        after = [self._store.add(key, 0) for key in keys]
        return [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]]

    def describe_lost_peers(self) -> str | None:
        """A few words naming the lost ranks, or None when every peer still beats (the failure is something else)."""
        if self._store is None:
            return "other ranks cannot be checked (no rendezvous store)"
        try:
            silent = self.silent_ranks()
        except Exception:
            return f"the rendezvous store at {self.address} is unreachable: rank 0 or the launcher hosting it died or froze"
        if not silent:
            return None
        return f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped responding (died or froze)"

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
