"""The one typed config of a run: YAML recipe + dotted `key=value` overrides -> `Config`.

Every key, its default and a one-line reason live in `configs/default.yaml`; the
dataclasses below are the single source of truth for names and types. Anything the
user gets wrong (unknown key, wrong type, impossible value) raises `ConfigError`
naming the key, before any process group, GPU or dataset is touched.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from carbrand.errors import ConfigError

MAX_EVAL_CROPS = 8  # each crop is one more forward pass per photo
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")  # model.arch names torchvision builds


@dataclass
class DataConfig:
    manifest: str = "demo/prepared"  # directory written by `carbrand prepare --out` or `carbrand shard --out` (or its shards.json)
    labels: str = "brand"  # what the network learns: brand | car_model (each brand's models, summed into it; Stanford Cars)
    loader: str = "auto"  # auto (DALI; torchvision for CPU decode over 4 workers) | dali | torchvision | memory (noise, for benchmarks)
    decode: str = "auto"  # auto (gpu when CUDA is there) | gpu (nvJPEG/HW decoder) | cpu
    image_size: int = 224  # square training crop, pixels (and the evaluation crop unless eval_image_size is set)
    eval_image_size: int = 0  # evaluation / prediction crop, pixels (0 = image_size): train low, test higher
    batch_size: int = 64  # per process; global batch = batch_size * world_size * grad_accum
    workers: int = 4  # DALI CPU threads, or DataLoader worker processes
    eval_crop_fraction: float = 0.875  # eval: resize short side to image_size / this, centre crop
    # eval, predict, serve: crops along the photo's longer side whose probabilities are averaged (1 = the centre
    # crop; 3 = start, centre and end, for wide photos whose car is not in the middle: preprocessing.eval_crop_boxes)
    eval_crops: int = 1
    crop_scale_min: float = 0.08  # train: RandomResizedCrop smallest area fraction
    # DALI mixed decoder: share of JPEGs sent to the hardware decoder; the rest decode on the SMs and the CPU
    # (hybrid). 0.99, not DALI's 0.65: on an H200 training ran 9 % faster with 1/7 of the host memory
    # (docs/BENCHMARKS.md, 2026-12-04). A GPU without the hardware decoder decodes everything the other way.
    hw_decoder_load: float = 0.99
    prefetch: int = 2  # DALI prefetch queue depth (batches)
    augment: str = "none"  # train: none | trivial (TrivialAugmentWide) | randaugment | autoaugment (ImageNet policy)
    randaugment_ops: int = 2  # randaugment: operations applied per image (N)
    randaugment_magnitude: int = 9  # randaugment: strength of each operation, 0..30 (M, of 31 bins)
    max_pixels: int = 0  # refuse larger images (0 = the dataset's: prepare --max-pixels, in manifest.json); travels with the export
    # the input normalisation the weights expect, RGB: (pixel / 255 - mean) / std; travels with the export
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))

    @property
    def eval_size(self) -> int:
        """The side of the evaluation crop: eval_image_size, or image_size when that is 0."""
        return self.eval_image_size or self.image_size


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # a torchvision ResNet (resnet18|34|50|101|152) or any timm model name (efficientnet_lite0, timm/resnet50)
    pretrained: str = "none"  # imagenet (torchvision's or timm's weights cache) | none | PATH (.safetensors, .pth, .pt)
    pretrained_key_map: str = "auto"  # PATH's naming: auto | none (the model's own) | efficientnet_pytorch
    freeze_backbone_epochs: int = 0  # head-only warm-up: the backbone's learning rate is 0 for the first N epochs
    freeze_batchnorm: bool = False  # BatchNorm keeps its pretrained running statistics (eval mode) while training
    drop_rate: float = 0.0  # dropout before the classifier head (timm models)
    drop_path_rate: float = 0.0  # stochastic depth: each residual block is skipped with up to this probability (timm models)
    compile: bool = False  # torch.compile the model (GPU: faster after warm-up)
    sync_batchnorm: bool = False  # SyncBatchNorm across ranks (small per-GPU batches)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1  # learning rate for a global batch of lr_reference_batch images
    lr_reference_batch: int = 256  # lr is scaled by global_batch / this (0 = no scaling)
    momentum: float = 0.9  # SGD momentum; AdamW uses it as beta1 (betas = (momentum, 0.999))
    nesterov: bool = False  # SGD Nesterov momentum
    weight_decay: float = 5.0e-5  # not applied to norm layers and biases
    warmup_epochs: float = 1.0  # linear warm-up from 0, then cosine decay
    min_lr_ratio: float = 0.0  # cosine decays to lr * this
    grad_clip_norm: float = 0.0  # clip the global gradient norm (0 = off)
    backbone_lr_scale: float = 1.0  # the backbone learns at lr * this, the new head at lr (fine-tuning: e.g. 0.1)


@dataclass
class TrainConfig:
    epochs: int = 10  # passes over the training split
    max_steps: int = 0  # stop after this many optimizer steps (0 = no limit)
    precision: str = "auto"  # auto (bf16 on a GPU with bf16, else fp16; fp32 on a CPU) | no | bf16 | fp16 (grad scaler)
    fp16_init_scale: float = 65536.0  # fp16: the grad scaler's first loss scale (2**16); halved at every skipped step
    channels_last: bool = True  # NHWC model and inputs (faster convolutions on tensor cores)
    seed: int = 0  # base seed; each rank uses seed + global rank for augmentation
    resume: str = "auto"  # auto (newest complete checkpoint in output.dir) | never | PATH
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    mixup_alpha: float = 0.0  # mixup: Beta(alpha, alpha) mixing weight per batch (0 = off; e.g. 0.2)
    cutmix_alpha: float = 0.0  # CutMix: Beta(alpha, alpha) kept area per batch (0 = off; e.g. 1.0)
    mix_switch_prob: float = 0.5  # with both on: probability that a batch uses CutMix instead of mixup
    ema_decay: float = 0.0  # EMA of weights, evaluated and exported when > 0 (e.g. 0.9998)
    log_every: int = 20  # steps between host syncs for loss / img/s logging
    eval_every_steps: int = 0  # validate every N steps (0 = at the end of every epoch)
    checkpoint_every_steps: int = 0  # extra checkpoints every N steps (0 = end of epoch only)
    keep_checkpoints: int = 3  # keep the newest K step checkpoints (best/ is kept apart)
    best_metric: str = "accuracy"  # accuracy | macro_f1: chooses best/ on val; last: best/ = the final weights
    cudnn_benchmark: bool = True  # autotune convolutions for fixed input shapes
    tf32: bool = True  # TF32 matmuls/convolutions on Ampere+ in fp32 regions
    collective_timeout_s: int = 1800  # a dead rank makes the others fail after this, never hang
    stop_deadline_s: int = 60  # after a stop signal, exit without a checkpoint if the graceful stop took this long


@dataclass
class OutputConfig:
    dir: str = "runs/default"  # the run directory: config, metrics, checkpoints, best/


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline | disabled (WANDB_MODE overrides)
    project: str = "carbrand"  # W&B project (WANDB_PROJECT overrides)
    entity: str | None = None  # W&B team or user (WANDB_ENTITY overrides)
    name: str | None = None  # run name (defaults to the run directory's name)
    tags: list[str] = field(default_factory=list)  # run tags


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ImageNet's channel statistics: what torchvision's weights (and most timm weights) expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# model.pretrained_key_map: the names of weights.KEY_MAPS (tests/test_pretrained.py holds them equal).
KEY_MAPS = ("efficientnet_pytorch",)
# train.precision: what each means in torch, and what auto becomes on which hardware, is carbrand/precision.py's table.
PRECISIONS = ("auto", "no", "bf16", "fp16")
# data.augment: the loaders implement each (data/augment_policies.py for torchvision, data/dali_augment.py for DALI).
# The names live here so that reading a config imports neither torch nor the loaders.
AUGMENT_POLICIES = ("none", "trivial", "randaugment", "autoaugment")

# A number in exponent notation, e.g. 1e-3, 2E5, 1.0e3, .5e-2 (what YAML 1.1 leaves as a string)
SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

CHOICES: dict[str, tuple[str, ...]] = {
    "data.loader": ("auto", "dali", "torchvision", "memory"),
    "data.decode": ("auto", "gpu", "cpu"),
    "data.labels": ("brand", "car_model"),
    "data.augment": AUGMENT_POLICIES,
    "model.pretrained_key_map": ("auto", "none", *KEY_MAPS),
    "optim.name": ("sgd", "adamw"),
    "train.precision": PRECISIONS,
    "train.best_metric": ("accuracy", "macro_f1", "last"),
    "wandb.mode": ("online", "offline", "disabled"),
}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or only defaults), apply `a.b=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for override in overrides or []:
        key, value = _parse_override(override)
        _set_dotted(raw, key, value)
    config = _build(Config, raw, prefix="")
    validate(config)
    return config


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a Config saved with `save_config` (checkpoints, exports)."""
    config = _build(Config, raw, prefix="")
    validate(config)
    return config


class _Yaml12BoolLoader(yaml.SafeLoader):
    """Safe YAML where only true/false are booleans (YAML 1.2): `precision: no` stays the string "no"."""


_Yaml12BoolLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12BoolLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def safe_yaml_load(text: str) -> Any:
    """yaml.safe_load with YAML 1.2 booleans: what every carbrand YAML file is read with."""
    return yaml.load(text, Loader=_Yaml12BoolLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = safe_yaml_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(raw).__name__}")
    return raw


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        parsed = safe_yaml_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value  # a plain string YAML cannot parse, e.g. a path with ': '
    return key.strip(), parsed


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{part}' is a value, so '{key}' cannot be set")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    name = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{name}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            valid = ", ".join(sorted(prefix + k for k in known))
            raise ConfigError(f"unknown config key '{prefix}{key}' (valid keys here: {valid})")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            values[f.name] = _build(hint, raw[f.name], prefix=f"{prefix}{f.name}.")
        else:
            values[f.name] = _coerce(raw[f.name], hint, f"{prefix}{f.name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Accept a YAML value if it fits the annotated type; ints widen to floats, nothing else converts."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(item, args[0], key) for item in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 and 1.0e3 as strings; everyone means a number
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)  # paths and names like `2024` stay strings
    raise ConfigError(f"config key '{key}' must be of type {hint.__name__}, got {value!r}")


def validate(config: Config) -> None:
    """Impossible values fail here, at start-up, with the key's name."""
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}; got {value!r}")

    def check(ok: bool, key: str, rule: str) -> None:
        if not ok:
            section, name = key.split(".")
            value = getattr(getattr(config, section), name)
            raise ConfigError(f"config key '{key}' {rule}; got {value!r}")

    d, m, o, t = config.data, config.model, config.optim, config.train
    check(bool(d.manifest), "data.manifest", "must name a prepared dataset directory or a sharded one")
    check(d.image_size >= 32, "data.image_size", "must be at least 32")
    check(d.eval_image_size == 0 or d.eval_image_size >= 32, "data.eval_image_size", "must be 0 (= image_size) or at least 32")
    check(len(d.mean) == 3 and all(0 <= v <= 1 for v in d.mean), "data.mean", "must be 3 values in [0, 1] (R, G, B)")
    check(len(d.std) == 3 and all(v > 0 for v in d.std), "data.std", "must be 3 values > 0 (R, G, B)")
    check(d.batch_size >= 1, "data.batch_size", "must be a positive integer")
    check(d.workers >= 0, "data.workers", "must be >= 0")
    check(0.0 < d.eval_crop_fraction <= 1.0, "data.eval_crop_fraction", "must be in (0, 1]")
    check(1 <= d.eval_crops <= MAX_EVAL_CROPS, "data.eval_crops", f"must be in 1..{MAX_EVAL_CROPS}")
    check(0.0 < d.crop_scale_min <= 1.0, "data.crop_scale_min", "must be in (0, 1]")
    check(0.0 <= d.hw_decoder_load <= 1.0, "data.hw_decoder_load", "must be in [0, 1]")
    check(d.prefetch >= 1, "data.prefetch", "must be >= 1")
    check(d.randaugment_ops >= 1, "data.randaugment_ops", "must be >= 1")
    check(0 <= d.randaugment_magnitude <= 30, "data.randaugment_magnitude", "must be in 0..30")
    check(d.max_pixels >= 0, "data.max_pixels", "must be 0 (the dataset's, from manifest.json) or a positive number of pixels")
    check(bool(m.arch), "model.arch", "must name a torchvision ResNet or a timm model")
    check(bool(m.pretrained), "model.pretrained", "must be imagenet, none or a file path")
    check(m.freeze_backbone_epochs >= 0, "model.freeze_backbone_epochs", "must be >= 0")
    for key in ("model.drop_rate", "model.drop_path_rate"):
        rate = getattr(m, key.split(".")[1])
        check(0.0 <= rate < 1.0, key, "must be in [0, 1) (0 = off)")
        # torchvision's ResNet has neither; timm's own ResNet-50 (timm/resnet50) has both
        check(rate == 0.0 or m.arch not in TORCHVISION_ARCHS, key,
              f"needs a timm model ({m.arch} is torchvision's; timm/{m.arch} is timm's)")
    check(o.lr > 0, "optim.lr", "must be > 0")
    check(o.lr_reference_batch >= 0, "optim.lr_reference_batch", "must be >= 0")
    check(0.0 <= o.momentum < 1.0, "optim.momentum", "must be in [0, 1)")
    check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    check(o.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
    check(o.grad_clip_norm >= 0, "optim.grad_clip_norm", "must be >= 0 (0 = off)")
    check(o.backbone_lr_scale >= 0, "optim.backbone_lr_scale", "must be >= 0")
    check(not (o.nesterov and o.name == "sgd" and o.momentum == 0), "optim.nesterov", "needs optim.momentum > 0")
    check(t.epochs >= 1, "train.epochs", "must be >= 1")
    check(t.max_steps >= 0, "train.max_steps", "must be >= 0 (0 = no limit)")
    check(t.fp16_init_scale > 0, "train.fp16_init_scale", "must be > 0")
    check(bool(t.resume), "train.resume", "must be auto, never or a checkpoint path")
    check(t.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
    check(0.0 <= t.label_smoothing < 1.0, "train.label_smoothing", "must be in [0, 1)")
    check(t.mixup_alpha >= 0, "train.mixup_alpha", "must be >= 0 (0 = off)")
    check(t.cutmix_alpha >= 0, "train.cutmix_alpha", "must be >= 0 (0 = off)")
    check(0.0 <= t.mix_switch_prob <= 1.0, "train.mix_switch_prob", "must be in [0, 1]")
    check(0.0 <= t.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1) (0 = off)")
    check(t.log_every >= 1, "train.log_every", "must be >= 1")
    check(t.eval_every_steps >= 0, "train.eval_every_steps", "must be >= 0")
    check(t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", "must be >= 0")
    check(t.collective_timeout_s >= 10, "train.collective_timeout_s", "must be >= 10 seconds")
    check(t.stop_deadline_s >= 1, "train.stop_deadline_s", "must be >= 1 second")
    check(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    check(bool(config.output.dir), "output.dir", "must name the run directory")
