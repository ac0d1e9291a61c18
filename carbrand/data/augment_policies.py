"""The `data.augment` policies, and their torchvision form (DALI's is in dali_augment.py).

    none         random-resized crop and flip only
    trivial      TrivialAugment-Wide: one op of 14 per image, magnitude uniform over 31 bins
    randaugment  RandAugment: `randaugment_ops` ops per image at magnitude `randaugment_magnitude` of 31 bins
    autoaugment  AutoAugment's ImageNet policy: one of 25 learned sub-policies (two ops each)

Both loaders apply the same family on the uint8 crop, after crop and flip and before
normalisation: torchvision.transforms.v2 here, nvidia.dali.auto_aug in the DALI graph.
Their op lists match by name; exact pixels differ (different resamplers and random streams).
Evaluation never augments.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

MAGNITUDE_BINS = 31  # torchvision's and DALI's default for TrivialAugment-Wide and RandAugment
TRANSLATE_FRACTION = 150 / 331  # RandAugment / AutoAugment: torchvision's largest shift, a fraction of the side
FILL_GREY = 128  # what uncovered corners of a rotated or sheared image show; DALI's default fill


def torchvision_augment(policy: str, *, ops: int, magnitude: int) -> v2.Transform | None:
    """The torchvision transform of `policy`, or None for `none`."""
    fill = [FILL_GREY] * 3
    nearest = v2.InterpolationMode.NEAREST  # torchvision's default, spelled out: the DALI graph uses it too
    if policy == "none":
        return None
    if policy == "trivial":
        return v2.TrivialAugmentWide(num_magnitude_bins=MAGNITUDE_BINS, interpolation=nearest, fill=fill)
    if policy == "randaugment":
        return v2.RandAugment(num_ops=ops, magnitude=magnitude, num_magnitude_bins=MAGNITUDE_BINS,
                             interpolation=nearest, fill=fill)
    if policy == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=nearest, fill=fill)
    raise ValueError(f"unknown augment policy {policy!r}")  # config.validate refuses it first


def apply_seeded(transform: v2.Transform, image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """`transform(image)` with torch's random draws seeded from `rng`, the sample's own generator.

    torchvision's policies draw from torch's global RNG; forking it keeps a sample's
    augmentation a function of its key (seed, rank, epoch, position), whatever the worker.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(0, 2**63 - 1)))
        return transform(image)
