"""One loader interface for the trainer and evaluator, two backends: DALI and torchvision.

    loader, decode = resolve_backend(config.data, device)
    train = build_train_loader(config.data, dataset.split("train"), rank=..., world_size=..., seed=...,
                               device=device, dtype=torch.bfloat16, channels_last=True)
    for epoch in range(start_epoch, epochs):
        train.set_epoch(epoch, start_batch=resume_batch if epoch == start_epoch else 0)
        for images, labels in train: ...

Images arrive on `device` as normalised `dtype` NCHW (channels_last when asked); labels
are int64 on `device`. Shards follow the *global* rank (see sharding.py); the loaders
never go through `accelerator.prepare`, so the evaluator counts samples itself through
the sample indices the eval loader returns.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch

from carbrand.config import DataConfig
from carbrand.data.manifest import Sample
from carbrand.errors import UsageError

logger = logging.getLogger(__name__)


class TrainLoader(Protocol):
    batches_per_epoch: int  # identical on every rank (DDP would hang otherwise)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch's order; skip its first `start_batch` batches (exact mid-epoch resume)."""

    def __len__(self) -> int:
        """Batches remaining in the current epoch (after start_batch)."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) on the device."""

    def close(self) -> None: ...


class EvalLoader(Protocol):
    num_samples: int  # samples on this rank

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images, labels, sample_indices); indices point into the `samples` list given."""

    def close(self) -> None: ...


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(data: DataConfig, device: torch.device) -> tuple[str, str]:
    """-> (loader, decode): loader 'dali' | 'torchvision' | 'memory', decode 'gpu' | 'cpu' | 'none'."""
    if data.loader == "memory":
        return "memory", "none"  # nothing is decoded
    if data.decode == "gpu" and device.type != "cuda":
        raise UsageError(f"data.decode=gpu needs a CUDA device, but this process runs on {device}; use data.decode=cpu or auto")
    loader = data.loader
    if loader == "auto":
        loader = "dali" if dali_available() else "torchvision"
        if loader == "torchvision":
            logger.warning("DALI is not installed: loading images with torchvision (pip install carbrand[dali] for the fast path)")
    elif loader == "dali" and not dali_available():
        raise UsageError("data.loader=dali but DALI is not installed: `pip install carbrand[dali]`, or set data.loader=torchvision")
    if data.decode == "auto":
        decode = "gpu" if device.type == "cuda" and loader == "dali" else "cpu"
    else:
        decode = data.decode
    if decode == "gpu" and loader != "dali":
        raise UsageError("data.decode=gpu needs the DALI loader (data.loader=dali, `pip install carbrand[dali]`); torchvision decodes on the CPU")
    return loader, decode


def build_train_loader(data: DataConfig, samples: Sequence[Sample], *, rank: int, world_size: int, seed: int,
                       device: torch.device, dtype: torch.dtype, channels_last: bool) -> TrainLoader:
    loader, decode = resolve_backend(data, device)
    if loader == "memory":
        from carbrand.data.memory_loader import MemoryTrainLoader

        return MemoryTrainLoader(data, samples, rank=rank, world_size=world_size, seed=seed, device=device, dtype=dtype,
                                  channels_last=channels_last)
    if loader == "dali":
        from carbrand.data.dali_pipelines import DaliTrainLoader

        return DaliTrainLoader(data, samples, rank=rank, world_size=world_size, seed=seed, gpu=decode == "gpu",
                               device=device, dtype=dtype, channels_last=channels_last)
    from carbrand.data.torch_loader import TorchTrainLoader

    return TorchTrainLoader(data, samples, rank=rank, world_size=world_size, seed=seed,
                            device=device, dtype=dtype, channels_last=channels_last)


def build_eval_loader(data: DataConfig, samples: Sequence[Sample], *, rank: int, world_size: int,
                      device: torch.device, dtype: torch.dtype, channels_last: bool) -> EvalLoader:
    loader, decode = resolve_backend(data, device)
    if loader == "memory":
        from carbrand.data.memory_loader import MemoryEvalLoader

        return MemoryEvalLoader(data, samples, rank=rank, world_size=world_size, device=device, dtype=dtype,
                                  channels_last=channels_last)
    if loader == "dali":
        from carbrand.data.dali_pipelines import DaliEvalLoader

        return DaliEvalLoader(data, samples, rank=rank, world_size=world_size, gpu=decode == "gpu",
                              device=device, dtype=dtype, channels_last=channels_last)
    from carbrand.data.torch_loader import TorchEvalLoader

    return TorchEvalLoader(data, samples, rank=rank, world_size=world_size,
                           device=device, dtype=dtype, channels_last=channels_last)
