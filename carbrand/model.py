"""The classifier: a torchvision ResNet with its ImageNet head replaced by one for the brands.

Weights come the way users already have them: `imagenet` through torchvision's weights
mechanism (the file in `$TORCH_HOME/hub/checkpoints`; when missing, downloaded once per node by
its first process while the others wait, and kept only if its sha256 matches the prefix in
torchvision's file name), a local state-dict file (safetensors, or a torch file read with
`weights_only=True`), or `none` for random initialisation.
"""

from __future__ import annotations

import hashlib
import os
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torchvision
from accelerate.state import PartialState, is_initialized
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
    """torchvision's ImageNet weights for `arch`, fetched into the cache once per node when missing."""
    path, url = imagenet_weights_path(arch)
    with node_local_main_first() as downloads:
        if downloads and not path.is_file():
            download_verified(url, path, arch)
    if not path.is_file():  # another process of this node: its local main could not fetch the file
        raise missing_weights_error(arch, url, path, "the first process on this node could not download them")
    return safe_torch_load(path)


@contextmanager
def node_local_main_first():
    """Yields whether this process may download: the node's local main process runs first, the others after it.

    build_model runs in train.set_up after the Accelerator exists; outside a process group
    (predict, a notebook) this process is alone and downloads itself. Every rank meets the
    barrier even when the download fails, so the others stop with a line instead of waiting
    for the collective timeout; all ranks take part whether or not their node has the file,
    so nodes never disagree about the collectives.
    """

    state = PartialState() if is_initialized() else None
    first = state is None or state.is_local_main_process
    if not first:
        state.wait_for_everyone()
    try:
        yield first
    finally:
        if first and state is not None:
            state.wait_for_everyone()


def download_verified(url: str, path: Path, arch: str) -> None:
    """Download `url` to a temporary file beside `path`, check torchvision's published hash, rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)  # a fresh TORCH_HOME has no hub/checkpoints yet
    # Unique per host and process: nodes sharing one cache folder never write the same file.
    temporary = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.partial")
    try:
        try:
            torch.hub.download_url_to_file(url, str(temporary), progress=False)
        except Exception as error:  # offline, proxy, disk: all mean the same thing to the user
            raise missing_weights_error(arch, url, path, type(error).__name__) from None
        expected, digest = published_hash_prefix(url), file_sha256(temporary)
        if expected and not digest.startswith(expected):
            raise CarbrandError(f"refused the download of {url}: its sha256 is {digest}, but torchvision publishes "
                                f"{expected}...; nothing was kept in {path.parent}")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def missing_weights_error(arch: str, url: str, path: Path, reason: str) -> CarbrandError:
    return CarbrandError(
        f"ImageNet weights for {arch} are not in the torchvision cache and could not be downloaded "
        f"({reason}): download {url} to {path} (or point TORCH_HOME at a cache holding it), "
        f"or set model.pretrained=none or model.pretrained=PATH"
    )


def published_hash_prefix(url: str) -> str:
    """The sha256 prefix torchvision puts in its file names (resnet50-11ad3fa6.pth), as torch.hub's check_hash reads it."""
    match = torch.hub.HASH_REGEX.search(os.path.basename(url))
    return match.group(1) if match else ""  # every torchvision ImageNet file name carries one


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
