"""The one table of precisions: what `train.precision` (and `--precision`) names mean in torch.

    no    float32 everywhere
    bf16  autocast to bfloat16; loaders hand over bfloat16 images
    fp16  autocast to float16 with a grad scaler (CUDA only); loaders hand over float16 images

The trainer, the evaluator, the predictor and the benchmarks all read this table; the names
themselves are config.PRECISIONS (config validation needs them without importing torch).
"""

from __future__ import annotations

import contextlib

import torch

# one entry per config.PRECISIONS name (tests/test_config.py holds them equal)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def input_dtype(precision: str) -> torch.dtype:
    """The dtype the loaders hand images over in for this precision."""
    return AUTOCAST_DTYPES[precision] or torch.float32


def autocast(device: torch.device, precision: str):
    """torch.autocast for `precision` on `device`; a no-op context for full precision."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
