"""What every loader shares: its shard of the split, its length, and where a train epoch starts.

A train loader yields `(images, labels)`; an eval loader `(images, labels, sample_indices)`.
Images arrive on the device as normalised NCHW of the asked dtype (channels_last when asked),
labels as int64 on the device. Backends (DALI, torchvision, memory) subclass these and only
add how batches are made.
"""

from __future__ import annotations

import numpy as np

from collections.abc import Sequence

from carbrand.data.manifest import Sample
from carbrand.data.sharding import eval_shard, sharded_train_shard, train_batches_per_epoch, train_shard


def shard_sizes(samples: Sequence[Sample]) -> list[int] | None:
    """Samples per shard, in order, for a sharded split (None for image files): what the sharded orders need."""
    if not samples or samples[0].member is None:
        return None
    sizes, last = [], None
    for sample in samples:
        if sample.member.shard != last:
            sizes.append(0)
            last = sample.member.shard
        sizes[-1] += 1
    return sizes


class TrainLoader:
    """This rank's batches of one epoch; `set_epoch` picks the epoch and the batch to start at."""

    def __init__(self, num_samples: int, *, rank: int, world_size: int, seed: int, batch_size: int,
                 shards: list[int] | None = None):
        """`shards`: samples per shard of a sharded split (shard_sizes), whose epochs are read shard by shard."""
        # identical on every rank: DDP would hang at the next all-reduce otherwise
        self.batches_per_epoch = train_batches_per_epoch(num_samples, world_size=world_size, batch_size=batch_size)
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.batch_size = seed, batch_size
        self.epoch, self.start_batch = 0, 0
        self.shards = shards

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch's order; skip its first `start_batch` batches (exact mid-epoch resume)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} is not in 0..{self.batches_per_epoch}")
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample indices this rank trains on in `epoch`, whole batches, in order."""
        if self.shards is not None:
            return sharded_train_shard(self.shards, seed=self.seed, epoch=epoch, rank=self.rank,
                                       world_size=self.world_size, batch_size=self.batch_size)
        return train_shard(self.num_samples, seed=self.seed, epoch=epoch, rank=self.rank,
                           world_size=self.world_size, batch_size=self.batch_size)

    def __len__(self) -> int:
        """Batches remaining in the current epoch (after start_batch)."""
        return self.batches_per_epoch - self.start_batch

    def close(self) -> None:
        """Release workers, threads and device buffers (nothing, unless a backend holds some)."""


class EvalLoader:
    """This rank's share of a split: every sample exactly once across ranks, the last batch partial."""

    def __init__(self, num_samples: int, *, rank: int, world_size: int, batch_size: int, sharded: bool = False):
        """`sharded`: the split is read from shards, each rank a contiguous run of them."""
        self.shard = eval_shard(num_samples, rank=rank, world_size=world_size, contiguous=sharded)
        self.num_samples = len(self.shard)  # samples on this rank (0 when there are more ranks than samples)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def close(self) -> None:
        """Release workers, threads and device buffers (nothing, unless a backend holds some)."""
