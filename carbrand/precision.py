"""The one table of precisions: what `train.precision` (and `--precision`) names mean in torch,
and which one `auto` picks for the hardware.

    auto  resolved once per run (`resolve_precision`): bf16 on a CUDA GPU with bf16, fp16 on
          one without, no on the CPU; nothing downstream ever sees the name auto
    no    float32 everywhere
    bf16  autocast to bfloat16; loaders hand over bfloat16 images
    fp16  autocast to float16 with a grad scaler (CUDA only); loaders hand over float16 images

The trainer, the evaluator, the predictor and the benchmarks all read this table; the names
themselves are config.PRECISIONS (config validation needs them without importing torch).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

# one entry per config.PRECISIONS name but auto, which resolve_precision turns into one of these (tests/test_config.py)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# CPU instruction sets with bfloat16 arithmetic, as torch.cpu.get_capabilities() names them: x86 (AVX-512 BF16,
# AMX) and ARM64 (the BF16 extension, SVE BF16). torch.backends.cpu.get_cpu_capability() cannot tell: it stops at "AVX512".
NATIVE_CPU_BF16 = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")
# One ResNet-50 training step at 224 px, batch 8, on a 2-core AVX2 CPU without native bf16: 3.29 images/s in fp32,
# 0.26 in bf16 autocast (docs/TRAINING.md)
CPU_BF16_SLOWDOWN = 12.7


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses and why: what the trainer's start line shows."""

    name: str  # no | bf16 | fp16, never auto
    reason: str  # "as set", or what auto saw: "auto: CPU", "auto: GPU with bf16", "auto: GPU without bf16"

    def __str__(self) -> str:
        return f"{'fp32' if self.name == 'no' else self.name} ({self.reason})"


def choose_precision(requested: str, device: torch.device) -> PrecisionChoice:
    """`requested` as it is, or for auto the fastest precision `device` trains well in."""
    if requested != "auto":
        return PrecisionChoice(requested, "as set")
    if device.type != "cuda":
        # fp32 on every CPU: fp16 needs CUDA, and bf16 ran CPU_BF16_SLOWDOWN times slower without native bf16
        return PrecisionChoice("no", f"auto: {device.type.upper()}")
    # native bf16 only (compute capability 8.0 on, or ROCm): older GPUs emulate it, and their tensor cores run fp16
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return PrecisionChoice("bf16", "auto: GPU with bf16")
    return PrecisionChoice("fp16", "auto: GPU without bf16")


def resolve_precision(requested: str, device: torch.device) -> str:
    """no | bf16 | fp16: `requested`, or what auto picks on `device`."""
    return choose_precision(requested, device).name


def has_native_cpu_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic instructions (torch's own CPU feature detection)."""
    capabilities = torch.cpu.get_capabilities()
    return any(capabilities.get(name, False) for name in NATIVE_CPU_BF16)


def cpu_bf16_warning(precision: str, device: torch.device) -> str | None:
    """The one warning for bf16 on a CPU without native bf16 (None when there is nothing to warn of)."""
    if precision != "bf16" or device.type != "cpu" or has_native_cpu_bf16():
        return None
    return (f"carbrand: warning: train.precision=bf16 on a CPU without native bf16 (AVX-512 BF16 or AMX): a ResNet-50 "
            f"trained {CPU_BF16_SLOWDOWN:g}x slower in bf16 than in fp32 on such a CPU; train.precision=auto (fp32 on a "
            f"CPU) or train.precision=no turns bf16 off")


def _autocast_dtype(precision: str) -> torch.dtype | None:
    assert precision in AUTOCAST_DTYPES, f"precision {precision!r} reached torch unresolved (resolve_precision first)"
    return AUTOCAST_DTYPES[precision]


def input_dtype(precision: str) -> torch.dtype:
    """The dtype the loaders hand images over in for this precision."""
    return _autocast_dtype(precision) or torch.float32


def autocast(device: torch.device, precision: str):
    """torch.autocast for `precision` on `device`; a no-op context for full precision."""
    dtype = _autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
