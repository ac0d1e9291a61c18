"""What the trainer logs about speed: loss, images/s and the time spent waiting for data, per log window.

Time spent validating or checkpointing is paused out of the window, so images/s and the
data-wait fraction describe training alone.
"""

from __future__ import annotations

import contextlib
import time

import torch


class ThroughputWindow:
    """Everything accumulated since the last log; `reset()` after each log."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)  # stays on the device: no host sync per step
        self.micro_batches = 0
        self.images = 0  # on this rank
        self.data_wait_seconds = 0.0
        self.paused_seconds = 0.0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss_sum += loss
        self.micro_batches += 1
        self.images += images

    def waiting_for_data(self):
        """The wait for the next batch: reported as the data-wait fraction."""
        return self._timed("data_wait_seconds")

    def paused(self):
        """Validation, checkpoints: kept out of images/s and the wait fraction."""
        return self._timed("paused_seconds")

    @contextlib.contextmanager
    def _timed(self, counter: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, counter, getattr(self, counter) + time.perf_counter() - started)

    def training_seconds(self) -> float:
        """Seconds of training in the window. Read it after a host sync: before one, the device may still
        be running queued steps."""
        return max(time.perf_counter() - self.started - self.paused_seconds, 1e-9)
