"""Stop on request: graceful on SIGUSR1 (SLURM's warning before the time limit) and SIGTERM (preemption),
prompt on a second SIGTERM/SIGINT or once a deadline has passed.

The handler only records the signal; the training loop asks `should_stop()` at log steps and
epoch ends, where all ranks agree through one all-reduce (a rank that got the signal late must
still stop with the others, or the next collective would hang), save a checkpoint together and
exit with a code a scheduler can act on. SIGINT (Ctrl-C) keeps Python's KeyboardInterrupt: the
run ends at once through its clean-up, with exit code 130.

A graceful stop can take too long: the next log step may be far away, or the main thread may sit
in a long C call (a compile, a collective, a slow step), where no Python signal handler runs.
So a watchdog thread, woken through `signal.set_wakeup_fd` (written by the C-level handler, so
whatever the main thread is doing), ends the process with `os._exit`:
  - on a second SIGTERM or SIGINT, with exit code 128 + that signal (143, 130);
  - `deadline_s` after the first stop signal (`train.stop_deadline_s`), with 128 + that signal
    (143 after SIGUSR1, what a requested stop returns).
It first prints one line naming the checkpoint `train.resume=auto` will use. A checkpoint being
written at that moment stays a hidden temporary (checkpoint.py writes under `.tmp-*` and
renames), which a resume never picks.

One request often arrives twice by two routes (SLURM signals every process of a step and the
launcher forwards the signal too; a terminal's Ctrl-C reaches the launcher and the workers), so
a signal within ECHO_SECONDS of the first counts as the same request. Limit: a C call that holds
the GIL delays the watchdog until it returns (torch, NCCL and DALI release it while they work).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import torch

from carbrand.checkpoint import step_checkpoints

EXIT_CODE_PREEMPTED = 143  # 128 + SIGTERM: what schedulers expect from a job that stopped on request
ECHO_SECONDS = 2.0  # a second signal sooner than this after the first is the same request by another route
PROMPT_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # a second one of these exits at once

_active: StopRequest | None = None  # the request whose watchdog reads the wakeup fd (one per process)


class StopRequest:
    def __init__(self, *, deadline_s: float, run_dir: Path,
                 signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        global _active
        self.received: int | None = None
        self.deadline_s = deadline_s
        self.run_dir = Path(run_dir)
        self._counted = (*signals, signal.SIGINT)  # SIGINT keeps its handler; the watchdog still counts it
        self._previous = {}
        for number in signals:
            self._previous[number] = signal.signal(number, self._handle)
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)  # set_wakeup_fd needs a non-blocking fd: a signal handler must never wait
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._finished = threading.Event()
        _active = self
        self._watchdog = threading.Thread(target=self._watch, name="carbrand-stop-watchdog", daemon=True)
        self._watchdog.start()

    def _handle(self, number: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.received = number

    def should_stop(self, accelerator) -> bool:
        """True on every rank as soon as any rank received a signal (one small all-reduce)."""
        return self.ranks_signalled(accelerator) > 0

    def ranks_signalled(self, accelerator) -> int:
        """How many ranks received a signal so far; the same answer on every rank (a collective)."""
        flag = torch.tensor([1 if self.received is not None else 0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return int(flag.item())  # host sync: called only at log/epoch boundaries and when stopping

    def restore(self) -> None:
        """The run is over: previous handlers back, the watchdog ends."""
        global _active
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        _active = None
        self._finished.set()
        try:
            self._writer.send(b"\0")  # wake the watchdog now (0 is no signal's number)
        except OSError:
            pass
        self._writer.close()

    def _watch(self) -> None:
        """Count stop signals as the kernel delivers them; exit on a second one or at the deadline."""
        first, first_at = None, 0.0
        with self._reader:
            while True:
                # never 0: that would make recv non-blocking, raising BlockingIOError instead of TimeoutError
                left = None if first is None else max(0.01, first_at + self.deadline_s - time.monotonic())
                self._reader.settimeout(left)
                try:
                    data = self._reader.recv(64)  # one byte per signal: its number
                except TimeoutError:
                    if self._finished.is_set():
                        return
                    exit_now(128 + first if first in PROMPT_SIGNALS else EXIT_CODE_PREEMPTED,
                             f"the stop on {signal.Signals(first).name} has not finished within "
                             f"train.stop_deadline_s={self.deadline_s:g} s", self.run_dir)
                    return
                except OSError:
                    return
                if not data or self._finished.is_set():
                    return  # restore(): the run is over, however it ended
                for number in (n for n in data if n in self._counted):
                    now = time.monotonic()
                    if first is None:
                        first, first_at = number, now
                    elif number in PROMPT_SIGNALS and now - first_at >= ECHO_SECONDS:
                        exit_now(128 + number, f"a second stop signal ({signal.Signals(number).name})", self.run_dir)
                        return


def resume_hint(run_dir: Path) -> str:
    """Which checkpoint `train.resume=auto` will use, as the last words of the exit line."""
    try:
        found = step_checkpoints(run_dir)
    except OSError:
        found = []
    if not found:
        return f"train.resume=auto finds no complete checkpoint in {run_dir} and starts from step 0"
    return f"train.resume=auto will resume from {found[-1][1]} (step {found[-1][0]})"


def exit_now(code: int, why: str, run_dir: Path) -> None:
    """One line on stderr, then end the process at once: no clean-up that could hang, no checkpoint."""
    line = f"carbrand: {why}: exiting now without a stop checkpoint; {resume_hint(run_dir)}\n"
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(2, line.encode(errors="replace"))  # below Python's buffers: written even if a stream is busy
    finally:
        os._exit(code)


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) must not write its signals into the parent's watchdog."""
    global _active
    if _active is not None:
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:  # forked from a thread that is not the main one: it has no wakeup fd of its own
            pass
        _active._writer.close()  # the child's copies only; the parent's watchdog is untouched
        _active._reader.close()
        _active = None


os.register_at_fork(after_in_child=_forget_in_child)
