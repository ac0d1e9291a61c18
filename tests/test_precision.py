"""train.precision auto: what it becomes on which hardware, and the one warning for bf16 on a CPU without native bf16."""

import pytest
import torch

from carbrand.errors import UsageError
from carbrand.inference.classifier import inference_precision
from carbrand.precision import choose_precision, cpu_bf16_warning, resolve_precision

CPU, GPU = torch.device("cpu"), torch.device("cuda")
# torch.cpu.get_capabilities() of an AVX2 CPU without bf16 instructions, and of one with AVX-512 BF16
AVX2 = {"architecture": "x86_64", "avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}
AVX512_BF16 = AVX2 | {"avx512_f": True, "avx512_bf16": True}


def fake_gpu(monkeypatch, native_bf16: bool) -> None:
    """A CUDA GPU as torch.cuda reports it, with or without native bf16; like torch, every GPU can emulate it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16 or including_emulation)


def fake_cpu(monkeypatch, capabilities: dict) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_a_gpu_is_bf16_where_it_is_native_and_fp16_elsewhere(monkeypatch, native_bf16, expected):
    fake_gpu(monkeypatch, native_bf16)
    choice = choose_precision("auto", GPU)
    assert choice.name == resolve_precision("auto", GPU) == expected
    assert str(choice) == f"{expected} (auto: GPU {'with' if native_bf16 else 'without'} bf16)"


def test_auto_on_the_cpu_is_fp32_and_a_named_precision_is_kept_everywhere(monkeypatch):
    choice = choose_precision("auto", CPU)
    assert (choice.name, str(choice)) == ("no", "fp32 (auto: CPU)")
    fake_gpu(monkeypatch, native_bf16=False)
    for device in (CPU, GPU):
        for named in ("no", "bf16", "fp16"):
            assert choose_precision(named, device).name == named
    assert str(choose_precision("bf16", CPU)) == "bf16 (as set)"


def test_inference_auto_takes_the_training_precision_on_a_gpu_and_fp32_on_the_cpu(monkeypatch):
    fake_gpu(monkeypatch, native_bf16=False)
    assert inference_precision("auto", "bf16", CPU) == "no"
    assert inference_precision("auto", "bf16", GPU) == "bf16"  # what the weights were trained in
    assert inference_precision("auto", "auto", GPU) == "fp16"  # an export whose config says auto: this GPU's choice
    assert inference_precision("fp16", "no", GPU) == "fp16"
    with pytest.raises(UsageError, match="--precision must be one of auto, no, bf16, fp16; got 'fp8'"):
        inference_precision("fp8", "no", CPU)


def test_bf16_on_a_cpu_without_native_bf16_warns_with_the_slowdown_and_the_way_out(monkeypatch):
    fake_cpu(monkeypatch, AVX2)
    warning = cpu_bf16_warning("bf16", CPU)
    assert warning.startswith("carbrand: warning: train.precision=bf16 on a CPU without native bf16")
    assert "12.7x slower" in warning and "train.precision=auto" in warning and "train.precision=no" in warning
    # auto never becomes bf16 on a CPU, and fp32 has nothing to warn of
    assert cpu_bf16_warning(resolve_precision("auto", CPU), CPU) is None
    assert cpu_bf16_warning("no", CPU) is None
    fake_cpu(monkeypatch, AVX512_BF16)
    assert cpu_bf16_warning("bf16", CPU) is None
    fake_cpu(monkeypatch, AVX2)
    assert cpu_bf16_warning("bf16", GPU) is None
