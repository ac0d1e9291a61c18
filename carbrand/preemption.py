"""Graceful stop on SIGUSR1 (SLURM's warning before the time limit) and SIGTERM (preemption).

The handler only records the signal; the training loop asks `should_stop()` at step
boundaries, where all ranks agree through one all-reduce (a rank that got the signal
late must still stop with the others, or the next collective would hang), save a
checkpoint together and exit with a code a scheduler can act on.
"""

from __future__ import annotations

import signal

import torch

EXIT_CODE_PREEMPTED = 143  # 128 + SIGTERM: what schedulers expect from a job that stopped on request


class StopRequest:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.received: int | None = None
        self._previous = {}
        for number in signals:
            self._previous[number] = signal.signal(number, self._handle)

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
        for number, previous in self._previous.items():
            signal.signal(number, previous)
