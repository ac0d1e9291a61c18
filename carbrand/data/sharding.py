"""Which sample indices each rank reads, per epoch. Pure functions: no torch.distributed.

Train: one global permutation per epoch, seeded by (seed, epoch) so every rank draws the
same one; rank r takes every world_size-th entry, cut to the same number of FULL batches
on every rank (unequal batch counts hang DDP at the next all-reduce). Because the order is
a pure function of (seed, epoch), a run resumed mid-epoch can skip exactly the batches it
has already trained on.

Eval: rank r takes indices r, r + world_size, ... — no padding and no drops, so the union
over ranks is exactly the split and every sample is counted once.

Sharded datasets (carbrand shard) keep both rules but read shard by shard: the epoch's global
order is the shards in a seeded order, each shard's samples in a seeded order of their own (a
shuffle buffer as large as the shard), and rank r takes the r-th contiguous block of it, so each
rank reads its own shards from start to end instead of a member here and there in all of them.
The samples left out of an epoch are, as with files, the fewer than one global batch that do not
fill one on every rank: here the tail of the epoch's order. Eval takes contiguous blocks too.
"""

from __future__ import annotations

import numpy as np

from carbrand.errors import DataError


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")


def train_batches_per_epoch(num_samples: int, *, world_size: int, batch_size: int) -> int:
    """Full batches each rank trains on per epoch (the same on every rank)."""
    batches = (num_samples // world_size) // batch_size
    if batches == 0:
        raise DataError(
            f"the training split has {num_samples} samples, fewer than one global batch "
            f"(data.batch_size {batch_size} x world size {world_size} = {batch_size * world_size}): "
            f"lower data.batch_size or use fewer processes"
        )
    return batches


def epoch_permutation(num_samples: int, *, seed: int, epoch: int) -> np.ndarray:
    """The epoch's global order, identical on every rank (seeded by seed and epoch only)."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def train_shard(num_samples: int, *, seed: int, epoch: int, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """Indices rank `rank` trains on in `epoch`, in order: batches_per_epoch * batch_size of them."""
    check_rank(rank, world_size)
    batches = train_batches_per_epoch(num_samples, world_size=world_size, batch_size=batch_size)
    permutation = epoch_permutation(num_samples, seed=seed, epoch=epoch)
    return permutation[rank::world_size][: batches * batch_size]


def sharded_train_shard(shard_sizes: list[int], *, seed: int, epoch: int, rank: int, world_size: int,
                        batch_size: int) -> np.ndarray:
    """Indices rank `rank` trains on in `epoch` of a sharded split (shard j holds the next shard_sizes[j] indices)."""
    check_rank(rank, world_size)
    batches = train_batches_per_epoch(sum(shard_sizes), world_size=world_size, batch_size=batch_size)
    # One stream per (seed, epoch), apart from epoch_permutation's: first the shards' order, then within each shard.
    rng = np.random.default_rng([seed, epoch, 1])
    starts = np.concatenate([[0], np.cumsum(shard_sizes)[:-1]]).astype(np.int64)
    order = np.concatenate([starts[j] + rng.permutation(shard_sizes[j]) for j in rng.permutation(len(shard_sizes))])
    per_rank = batches * batch_size
    return order[rank * per_rank:(rank + 1) * per_rank]


def eval_shard(num_samples: int, *, rank: int, world_size: int, contiguous: bool = False) -> np.ndarray:
    """Indices rank `rank` evaluates; may be empty when there are more ranks than samples."""
    check_rank(rank, world_size)
    if contiguous:  # a sharded split: each rank reads its own run of shards
        return np.array_split(np.arange(num_samples), world_size)[rank]
    return np.arange(rank, num_samples, world_size)


def augmentation_seed(seed: int, *, rank: int, epoch: int) -> int:
    """Seed for one rank's random crops and flips in one epoch.

    Mixed through a SeedSequence (not seed + rank + epoch) so that (rank 1, epoch 0) and
    (rank 0, epoch 1) do not share a stream; ranks differ and a restart repeats its epoch.
    DALI wants a non-negative 31-bit int.
    """
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0] & 0x7FFFFFFF)
