"""One loader interface for the trainer and evaluator, three backends: DALI, torchvision, memory.

    backend = resolve_backend(config.data, device)          # once per run: one notice, one answer
    train = build_train_loader(config.data, dataset.split("train"), backend=backend, rank=..., world_size=...,
                               seed=..., device=device, dtype=torch.bfloat16, channels_last=True)
    for epoch in range(start_epoch, epochs):
        train.set_epoch(epoch, start_batch=resume_batch if epoch == start_epoch else 0)
        for images, labels in train: ...

Images arrive on `device` as normalised `dtype` NCHW (channels_last when asked); labels
are int64 on `device` (see loader_base.py). Shards follow the *global* rank (sharding.py);
the loaders never go through `accelerator.prepare`, so the evaluator counts samples itself
through the sample indices the eval loader returns.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch

from carbrand.config import DataConfig
from carbrand.data.loader_base import EvalLoader, TrainLoader
from carbrand.data.manifest import Sample
from carbrand.data.memory_loader import MemoryEvalLoader, MemoryTrainLoader
from carbrand.data.shard_check import check_split_shards
from carbrand.data.torch_loader import TorchEvalLoader, TorchTrainLoader
from carbrand.errors import UsageError

logger = logging.getLogger(__name__)


class Backend(NamedTuple):
    loader: str  # dali | torchvision | memory
    decode: str  # gpu | cpu | none (memory: nothing is decoded)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(data: DataConfig, device: torch.device) -> Backend:
    """`data.loader` and `data.decode` (each possibly `auto`) -> the backend this process uses."""
    if data.loader == "memory":
        return Backend("memory", "none")
    if data.decode == "gpu" and device.type != "cuda":
        raise UsageError(f"data.decode=gpu needs a CUDA device, but this process runs on {device}; use data.decode=cpu or auto")
    loader = data.loader
    if loader == "auto":
        loader = _auto_loader(data, device)
    elif loader == "dali" and not dali_available():
        raise UsageError("data.loader=dali but DALI is not installed: `pip install carbrand[dali]`, or set data.loader=torchvision")
    if data.decode == "auto":
        decode = "gpu" if device.type == "cuda" and loader == "dali" else "cpu"
    else:
        decode = data.decode
    if decode == "gpu" and loader != "dali":
        raise UsageError("data.decode=gpu needs the DALI loader (data.loader=dali, `pip install carbrand[dali]`); torchvision decodes on the CPU")
    return Backend(loader, decode)


# `data.loader: auto` decoding on the CPU: DALI while it has at most this many threads, else torchvision.
# Measured (docs/BENCHMARKS.md): DALI's CPU decode ran 1.5-2.1x torchvision with 2 threads against 2 workers
# on a 2-core host, and 0.50-0.75x with 16 against 16 on a 16-core host. Per thread at 1024x768, DALI ran
# 270 img/s on the first and 135 on the second; a torchvision worker 180 and 190. The ratio interpolated
# log-linearly between the two hosts crosses 1 at about 5 threads.
DALI_CPU_DECODE_MAX_THREADS = 4


def _auto_loader(data: DataConfig, device: torch.device) -> str:
    if not dali_available():
        logger.warning("DALI is not installed: loading images with torchvision (pip install carbrand[dali] for the fast path)")
        return "torchvision"
    gpu_decode = device.type == "cuda" and data.decode != "cpu"
    if gpu_decode or data.workers <= DALI_CPU_DECODE_MAX_THREADS:
        return "dali"
    logger.info("data.loader=auto: decoding on the CPU with %d workers, torchvision's worker processes are faster than "
                "DALI's threads above %d (docs/BENCHMARKS.md); set data.loader=dali to override",
                data.workers, DALI_CPU_DECODE_MAX_THREADS)
    return "torchvision"


def build_train_loader(data: DataConfig, samples: Sequence[Sample], *, backend: Backend, rank: int, world_size: int,
                       seed: int, device: torch.device, dtype: torch.dtype, channels_last: bool) -> TrainLoader:
    options = dict(rank=rank, world_size=world_size, seed=seed, device=device, dtype=dtype, channels_last=channels_last)
    if backend.loader == "memory":
        return MemoryTrainLoader(data, samples, **options)
    # A sharded split: this rank's part of its shards checked through before the first step (nothing for files).
    check_split_shards(samples, rank=rank, world_size=world_size, max_pixels=data.max_pixels)
    if backend.loader == "dali":
        from carbrand.data.dali_pipelines import DaliTrainLoader  # DALI is an optional extra: imported only when used

        return DaliTrainLoader(data, samples, gpu=backend.decode == "gpu", **options)
    return TorchTrainLoader(data, samples, **options)


def build_eval_loader(data: DataConfig, samples: Sequence[Sample], *, backend: Backend, rank: int, world_size: int,
                      device: torch.device, dtype: torch.dtype, channels_last: bool) -> EvalLoader:
    options = dict(rank=rank, world_size=world_size, device=device, dtype=dtype, channels_last=channels_last)
    if backend.loader == "memory":
        return MemoryEvalLoader(data, samples, **options)
    check_split_shards(samples, rank=rank, world_size=world_size, max_pixels=data.max_pixels)
    if backend.loader == "dali":
        from carbrand.data.dali_pipelines import DaliEvalLoader  # DALI is an optional extra: imported only when used

        return DaliEvalLoader(data, samples, gpu=backend.decode == "gpu", **options)
    return TorchEvalLoader(data, samples, **options)
