"""The classifier: a torchvision ResNet with its ImageNet head replaced by one for the brands.

Weights come the way users already have them: `imagenet` through torchvision's weights
mechanism (the file in `$TORCH_HOME/hub/checkpoints`, downloaded once when online), a
local state-dict file (safetensors, or a torch file read with `weights_only=True`), or
`none` for random initialisation.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

from carbrand.errors import CarbrandError, UsageError

HEAD_PREFIX = "fc."
# Prefixes added by wrappers (DDP, torch.compile, Accelerate) that a plain state dict must not carry.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def build_model(arch: str, num_classes: int, pretrained: str = "none") -> nn.Module:
    """A ResNet with a `num_classes` head; backbone weights from `pretrained`."""
    if not hasattr(torchvision.models, arch) or not arch.startswith("resnet"):
        raise UsageError(f"config key 'model.arch' must be a torchvision ResNet (resnet18..resnet152); got {arch!r}")
    model = getattr(torchvision.models, arch)(weights=None)
    if pretrained == "imagenet":
        model.load_state_dict(imagenet_state_dict(arch))
    elif pretrained != "none":
        load_backbone_file(model, Path(pretrained))
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def imagenet_weights_path(arch: str) -> tuple[Path, str]:
    """Where torchvision keeps `arch`'s default ImageNet weights, and where they download from."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url), weights.url


def imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    path, url = imagenet_weights_path(arch)
    if not path.is_file():
        try:
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except Exception as error:  # offline, proxy, disk: all mean the same thing to the user
            raise CarbrandError(
                f"ImageNet weights for {arch} are not in the torchvision cache and could not be downloaded "
                f"({type(error).__name__}): download {url} to {path} (or point TORCH_HOME at a cache holding it), "
                f"or set model.pretrained=none or model.pretrained=PATH"
            ) from None
    return safe_torch_load(path)


def safe_torch_load(path: Path):
    """torch.load that never unpickles arbitrary objects (weights_only) and keeps its pickle-protocol chatter quiet."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Detected pickle protocol 4 ...": the refusal, if any, says what matters
        return torch.load(path, map_location="cpu", weights_only=True)


def load_failure_reason(error: Exception) -> str:
    """The useful line of a failed load: what the safe loader refused, never torch's advice to turn weights_only off."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        skip = ("Please file an issue", "Check the documentation", "WeightsUnpickler error")
        useful = [line for line in lines[1:] if not line.startswith(skip)]
        return "refused by the weights-only loader: " + (useful[0] if useful else "not plain tensors")[:200]
    return (lines or [type(error).__name__])[0][:200]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file, never unpickling arbitrary objects."""
    if not path.is_file():
        raise CarbrandError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = safe_torch_load(path)
    except Exception as error:
        raise CarbrandError(f"{path} is not a readable weights file ({load_failure_reason(error)})") from None
    if isinstance(state, dict) and ("model" in state or "state_dict" in state):
        state = state.get("model", state.get("state_dict"))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CarbrandError(f"{path} does not hold a state dict of tensors")
    return {strip_wrapper_prefixes(k): v for k, v in state.items()}


def strip_wrapper_prefixes(key: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def load_backbone_file(model: nn.Module, path: Path) -> None:
    """Load every backbone tensor from `path`; the head is ignored (it is replaced anyway)."""
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(HEAD_PREFIX)}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIX)}
    check_state_fits(state, expected, str(path))
    model.load_state_dict(state, strict=False)


def load_classifier_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a full exported state dict (head included) with a clear error on any mismatch."""
    state = {strip_wrapper_prefixes(k): v for k, v in state.items()}
    check_state_fits(state, model.state_dict(), source)
    model.load_state_dict(state)


def check_state_fits(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong_shape[:2]]
        examples = ", ".join(shapes or (missing[:2] + unexpected[:2]))
        raise CarbrandError(
            f"{source} does not fit this model: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong_shape)} wrong-shaped tensors (e.g. {examples})"
        )


def is_head_parameter(name: str) -> bool:
    return strip_wrapper_prefixes(name).startswith(HEAD_PREFIX)
