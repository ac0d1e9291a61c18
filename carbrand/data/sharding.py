"""Which sample indices each rank reads, per epoch. Pure functions: no torch.distributed.

Train: one global permutation per epoch, seeded by (seed, epoch) so every rank draws the
same one; rank r takes every world_size-th entry, cut to the same number of FULL batches
on every rank (unequal batch counts hang DDP at the next all-reduce). Because the order is
a pure function of (seed, epoch), a run resumed mid-epoch can skip exactly the batches it
has already trained on.

Eval: rank r takes indices r, r + world_size, ... — no padding and no drops, so the union
over ranks is exactly the split and every sample is counted once.
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


def eval_shard(num_samples: int, *, rank: int, world_size: int) -> np.ndarray:
    """Indices rank `rank` evaluates; may be empty when there are more ranks than samples."""
    check_rank(rank, world_size)
    return np.arange(rank, num_samples, world_size)


def augmentation_seed(seed: int, *, rank: int, epoch: int) -> int:
    """Seed for one rank's random crops and flips in one epoch.

    Mixed through a SeedSequence (not seed + rank + epoch) so that (rank 1, epoch 0) and
    (rank 0, epoch 1) do not share a stream; ranks differ and a restart repeats its epoch.
    DALI wants a non-negative 31-bit int.
    """
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0] & 0x7FFFFFFF)
