"""Mixup and CutMix on the device batch, and the soft-target loss they need.

    mix = draw_mix(train_config, rank=r, epoch=e, batch=b, batch_size=n)   # host-side draws
    images, partner = apply_mix(images, labels, mix)                       # on the device
    loss = mixed_cross_entropy(logits, labels, partner, mix.weight, smoothing)

Each micro-batch's draws (which of mixup/CutMix, the weight, the box, the partner order) are
a pure function of (seed, rank, epoch, micro-batch in epoch), like the loader's crops: every
rank draws its own stream, a run is reproducible, and a resumed run (any micro-batch, after
any restart) draws exactly what the uninterrupted run drew, with no generator state to save.
Draws happen on the host with numpy, so the box and weight are plain numbers: no device sync.

The loss is the cross-entropy against the mixed soft target
    weight * smooth(onehot(y)) + (1 - weight) * smooth(onehot(y_partner)),
which (cross-entropy being linear in the target) is the weighted sum of two label-smoothed
cross-entropies; with mixing off it is exactly F.cross_entropy(..., label_smoothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from carbrand.config import TrainConfig

MIX_STREAM = 0x6D6978  # "mix": keeps these draws apart from the loader's (seed, rank, epoch, position)


@dataclass(frozen=True)
class Mix:
    """One micro-batch's draw: `weight` of the original image kept; the box is CutMix's pasted region."""

    kind: str  # "none" | "mixup" | "cutmix"
    weight: float  # share of the target that is the image's own label
    permutation: np.ndarray | None  # partner of each image in the batch
    box: tuple[int, int, int, int] | None = None  # CutMix (top, left, bottom, right) in output pixels


NO_MIX = Mix("none", 1.0, None)


def mixing_enabled(train: TrainConfig) -> bool:
    return train.mixup_alpha > 0 or train.cutmix_alpha > 0


def mixing_summary(train: TrainConfig) -> str:
    """What the start-up line says about mixing, e.g. "mixup 0.2 + CutMix 1.0 (CutMix on 50% of batches)"."""
    if not mixing_enabled(train):
        return "no mixup/CutMix"
    if train.mixup_alpha > 0 and train.cutmix_alpha > 0:
        return (f"mixup {train.mixup_alpha:g} + CutMix {train.cutmix_alpha:g} "
                f"(CutMix on {train.mix_switch_prob:.0%} of batches)")
    return f"mixup {train.mixup_alpha:g}" if train.mixup_alpha > 0 else f"CutMix {train.cutmix_alpha:g}"


def draw_mix(train: TrainConfig, *, rank: int, epoch: int, batch: int, batch_size: int, image_size: int) -> Mix:
    """The draw for micro-batch `batch` of `epoch` on `rank` (see the module docstring)."""
    if not mixing_enabled(train):
        return NO_MIX
    rng = np.random.default_rng([MIX_STREAM, train.seed, rank, epoch, batch])
    use_cutmix = train.cutmix_alpha > 0 and (train.mixup_alpha == 0 or rng.random() < train.mix_switch_prob)
    alpha = train.cutmix_alpha if use_cutmix else train.mixup_alpha
    weight = float(rng.beta(alpha, alpha))
    permutation = rng.permutation(batch_size)
    if not use_cutmix:
        return Mix("mixup", weight, permutation)
    box = cutmix_box(image_size, 1.0 - weight, rng)
    top, left, bottom, right = box
    # the weight is the area really kept: the box was clipped at the borders
    kept = 1.0 - (bottom - top) * (right - left) / (image_size * image_size)
    return Mix("cutmix", kept, permutation, box)


def cutmix_box(size: int, area: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A square-ratio box of about `area` of a size x size image, centred anywhere, clipped at the borders."""
    cut = size * math.sqrt(area)
    centre_y, centre_x = rng.integers(0, size, 2)
    top, bottom = int(np.clip(centre_y - cut / 2, 0, size)), int(np.clip(centre_y + cut / 2, 0, size))
    left, right = int(np.clip(centre_x - cut / 2, 0, size)), int(np.clip(centre_x + cut / 2, 0, size))
    return top, left, bottom, right


def apply_mix(images: torch.Tensor, labels: torch.Tensor, mix: Mix) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed images, partner labels). NCHW images in any memory format; nothing is synced to the host."""
    if mix.kind == "none":
        return images, labels
    order = torch.as_tensor(mix.permutation).to(images.device, non_blocking=True)
    partner_images, partner_labels = images[order], labels[order]
    if mix.kind == "mixup":
        return images.lerp(partner_images, 1.0 - mix.weight), partner_labels
    top, left, bottom, right = mix.box
    mixed = images.clone()
    mixed[:, :, top:bottom, left:right] = partner_images[:, :, top:bottom, left:right]
    return mixed, partner_labels


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, partner_labels: torch.Tensor, weight: float,
                        label_smoothing: float) -> torch.Tensor:
    """Cross-entropy against the mixed, label-smoothed soft target (see the module docstring)."""
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if weight == 1.0:
        return loss
    partner_loss = F.cross_entropy(logits, partner_labels, label_smoothing=label_smoothing)
    return weight * loss + (1.0 - weight) * partner_loss
