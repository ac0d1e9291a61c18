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
from carbrand.data.loader_base import EvalLoader, TrainLoader
from carbrand.data.manifest import Sample


def random_batch(batch_size: int, image_size: int, *, seed: int, device: torch.device, dtype: torch.dtype,
                 channels_last: bool) -> torch.Tensor:
    """Normalised-looking noise in the loaders' output format (NCHW, channels_last if asked)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(device=device, dtype=dtype, memory_format=layout)


class MemoryTrainLoader(TrainLoader):
    def __init__(self, data: DataConfig, samples: Sequence[Sample], *, rank: int, world_size: int, seed: int,
                 device: torch.device, dtype: torch.dtype, channels_last: bool):
        super().__init__(len(samples), rank=rank, world_size=world_size, seed=seed, batch_size=data.batch_size)
        self._images = random_batch(data.batch_size, data.image_size, seed=seed + rank, device=device, dtype=dtype,
                                    channels_last=channels_last)
        labels = [samples[i % len(samples)].label for i in range(data.batch_size)]
        self._labels = torch.tensor(labels, dtype=torch.int64, device=device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(len(self)):  # every epoch is the same batch
            yield self._images, self._labels


class MemoryEvalLoader(EvalLoader):
    def __init__(self, data: DataConfig, samples: Sequence[Sample], *, rank: int, world_size: int,
                 device: torch.device, dtype: torch.dtype, channels_last: bool):
        super().__init__(len(samples), rank=rank, world_size=world_size, batch_size=data.batch_size)
        self._images = random_batch(data.batch_size, data.eval_size, seed=rank, device=device, dtype=dtype,
                                    channels_last=channels_last)
        self._labels = torch.tensor([s.label for s in samples], dtype=torch.int64)
        self._device = device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for start in range(0, self.num_samples, self.batch_size):
            indices = torch.as_tensor(self.shard[start:start + self.batch_size], dtype=torch.int64)
            yield self._images[:len(indices)], self._labels[indices].to(self._device), indices
