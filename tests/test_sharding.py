"""Shard arithmetic: equal full-batch train shards, exact eval cover, reproducible orders."""

import numpy as np
import pytest

from carbrand.data.sharding import augmentation_seed, eval_shard, train_batches_per_epoch, train_shard
from carbrand.errors import DataError


def test_train_shards_are_disjoint_full_batches_from_one_permutation():
    shards = [train_shard(103, seed=7, epoch=3, rank=r, world_size=3, batch_size=8) for r in range(3)]
    assert [len(s) for s in shards] == [32, 32, 32]  # 103 // 3 = 34 -> 4 full batches of 8
    joined = np.concatenate(shards)
    assert len(set(joined.tolist())) == len(joined)  # no sample on two ranks
    assert set(joined.tolist()) <= set(range(103))


def test_train_order_depends_on_seed_and_epoch_only():
    a = train_shard(50, seed=1, epoch=0, rank=1, world_size=2, batch_size=5)
    assert np.array_equal(a, train_shard(50, seed=1, epoch=0, rank=1, world_size=2, batch_size=5))
    assert not np.array_equal(a, train_shard(50, seed=1, epoch=1, rank=1, world_size=2, batch_size=5))
    assert not np.array_equal(a, train_shard(50, seed=2, epoch=0, rank=1, world_size=2, batch_size=5))


def test_too_small_training_split_names_the_global_batch():
    with pytest.raises(DataError, match=r"7 samples, fewer than one global batch .*= 8"):
        train_batches_per_epoch(7, world_size=2, batch_size=4)


@pytest.mark.parametrize("num_samples, world_size", [(10, 3), (9, 3), (2, 4), (0, 2)])
def test_eval_shards_cover_the_split_exactly_once(num_samples, world_size):
    joined = np.concatenate([eval_shard(num_samples, rank=r, world_size=world_size) for r in range(world_size)])
    assert sorted(joined.tolist()) == list(range(num_samples))


def test_augmentation_seeds_differ_across_ranks_and_epochs():
    seeds = {augmentation_seed(0, rank=r, epoch=e) for r in range(4) for e in range(4)}
    assert len(seeds) == 16
    assert all(0 <= s < 2**31 for s in seeds)



def test_a_restarted_process_draws_the_same_augmentation_seeds():
    """A resume is a new process: it must get the seeds the killed one had (no per-process salt such as
    Python's string hashing, a PID or the clock)."""
    import json
    import subprocess
    import sys

    from tests.helpers.paths import REPO
    from tests.helpers.subprocesses import subprocess_environment

    keys = [(seed, rank, epoch) for seed in (0, 7) for rank in range(3) for epoch in range(3)]
    code = ("import json, sys; from carbrand.data.sharding import augmentation_seed; "
            "print(json.dumps([augmentation_seed(s, rank=r, epoch=e) for s, r, e in json.loads(sys.argv[1])]))")
    other = subprocess.run([sys.executable, "-c", code, json.dumps(keys)], capture_output=True, text=True, timeout=120,
                           env=subprocess_environment() | {"PYTHONHASHSEED": "random"}, cwd=REPO, check=True)
    assert json.loads(other.stdout) == [augmentation_seed(s, rank=r, epoch=e) for s, r, e in keys]


def test_bad_rank_is_refused():
    with pytest.raises(ValueError):
        eval_shard(10, rank=2, world_size=2)
