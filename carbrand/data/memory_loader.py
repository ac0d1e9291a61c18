"""The `memory` loader: one random batch made once on the device and served again and again.

It shows what the model and the training loop reach with no input pipeline at all:
`carbrand bench train` compares it with the real loader, and `data.loader=memory`
tells a user whether a slow run is input-bound. Batch counts, shards and labels follow
the real dataset, so the run's length and the evaluator's sample count are unchanged;
the images are noise, so accuracy means nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from carbrand.config import DataConfig
from carbrand.data.manifest import Sample
from carbrand.data.sharding import eval_shard, train_batches_per_epoch


def random_batch(batch_size: int, image_size: int, *, seed: int, device: torch.device, dtype: torch.dtype,
                 channels_last: bool) -> torch.Tensor:
    """Normalised-looking noise in the loaders' output format (NCHW, channels_last if asked)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(device=device, dtype=dtype, memory_format=layout)


class MemoryTrainLoader:
    def __init__(self, data: DataConfig, samples: Sequence[Sample], *, rank: int, world_size: int, seed: int,
                 device: torch.device, dtype: torch.dtype, channels_last: bool):
        self.batches_per_epoch = train_batches_per_epoch(len(samples), world_size=world_size, batch_size=data.batch_size)
        self._images = random_batch(data.batch_size, data.image_size, seed=seed + rank, device=device, dtype=dtype,
                                    channels_last=channels_last)
        labels = [samples[i % len(samples)].label for i in range(data.batch_size)]
        self._labels = torch.tensor(labels, dtype=torch.int64, device=device)
        self._start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:  # noqa: ARG002 - every epoch is the same batch
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} is not in 0..{self.batches_per_epoch}")
        self._start_batch = start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self._start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(len(self)):
            yield self._images, self._labels

    def close(self) -> None:
        """Nothing to release."""


class MemoryEvalLoader:
    def __init__(self, data: DataConfig, samples: Sequence[Sample], *, rank: int, world_size: int,
                 device: torch.device, dtype: torch.dtype, channels_last: bool):
        self._shard = eval_shard(len(samples), rank=rank, world_size=world_size)
        self.num_samples = len(self._shard)
        self._batch_size = data.batch_size
        self._images = random_batch(data.batch_size, data.image_size, seed=rank, device=device, dtype=dtype,
                                    channels_last=channels_last)
        self._labels = torch.tensor([s.label for s in samples], dtype=torch.int64)
        self._device = device

    def __len__(self) -> int:
        return -(-self.num_samples // self._batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for start in range(0, self.num_samples, self._batch_size):
            indices = torch.as_tensor(self._shard[start:start + self._batch_size], dtype=torch.int64)
            yield self._images[:len(indices)], self._labels[indices].to(self._device), indices

    def close(self) -> None:
        """Nothing to release."""
