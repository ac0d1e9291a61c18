"""data.loader=memory: the same batch counts, shards and labels as the real loaders, no decoding."""

from __future__ import annotations

import torch

from carbrand.config import DataConfig
from carbrand.data.loaders import build_eval_loader, build_train_loader, resolve_backend
from carbrand.data.manifest import Sample
from carbrand.data.sharding import train_batches_per_epoch

CPU = torch.device("cpu")


def samples(count: int) -> list[Sample]:
    return [Sample(path=f"/nowhere/{i}.jpg", label=i % 3, brand=str(i % 3)) for i in range(count)]


def test_memory_train_loader_matches_the_real_batch_count_and_format():
    data = DataConfig(loader="memory", batch_size=4, image_size=16)
    assert resolve_backend(data, CPU) == ("memory", "none")
    loader = build_train_loader(data, samples(30), backend=resolve_backend(data, CPU), rank=1, world_size=2, seed=0, device=CPU, dtype=torch.bfloat16,
                                channels_last=True)
    assert loader.batches_per_epoch == train_batches_per_epoch(30, world_size=2, batch_size=4) == 3
    loader.set_epoch(0, start_batch=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    images, labels = batches[0]
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.bfloat16
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 0]


def test_memory_eval_loader_yields_every_sample_of_the_shard_once():
    data = DataConfig(loader="memory", batch_size=4, image_size=8)
    seen = []
    for rank in range(2):
        loader = build_eval_loader(data, samples(11), backend=resolve_backend(data, CPU), rank=rank, world_size=2, device=CPU, dtype=torch.float32,
                                   channels_last=False)
        for images, labels, indices in loader:
            assert images.shape[0] == len(labels) == len(indices)
            assert labels.tolist() == [i % 3 for i in indices.tolist()]
            seen += indices.tolist()
    assert sorted(seen) == list(range(11))
