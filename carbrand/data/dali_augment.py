"""`data.augment` inside the DALI train graph, through nvidia.dali.auto_aug.

The policies run where the images are: on the GPU after the "mixed" decoder, on the CPU in
a CPU-only pipeline (`device_id=None`). They use DALI conditionals, so the train pipeline is
defined with `enable_conditionals=True`. The op lists match torchvision's (augment_policies.py).
"""

from __future__ import annotations

from nvidia.dali import types
from nvidia.dali.auto_aug import auto_augment, rand_augment, trivial_augment

from carbrand.config import DataConfig
from carbrand.data.augment_policies import FILL_GREY, MAGNITUDE_BINS, TRANSLATE_FRACTION


def apply_augment_policy(images, data: DataConfig):
    """`images` (uint8 HWC, one size) with the `data.augment` policy applied; unchanged for `none`."""
    # Translations as torchvision's: TrivialAugment-Wide up to 32 px whatever the size (DALI's default without a
    # shape); RandAugment and AutoAugment up to 150/331 of the side (DALI's defaults are 100 and 250 px).
    relative = {"shape": [data.image_size, data.image_size], "max_translate_rel": TRANSLATE_FRACTION}
    # Nearest-neighbour warps (shear, translate, rotate), as torchvision's policies default to. DALI's default,
    # bilinear, made its CPU TrivialAugment 2.3x slower (1.49 against 0.66 thread-ms per 224 px image).
    warp = {"fill_value": FILL_GREY, "interp_type": types.INTERP_NN}
    if data.augment == "trivial":
        return trivial_augment.trivial_augment_wide(images, num_magnitude_bins=MAGNITUDE_BINS, **warp)
    if data.augment == "randaugment":
        return rand_augment.rand_augment(images, n=data.randaugment_ops, m=data.randaugment_magnitude,
                                         num_magnitude_bins=MAGNITUDE_BINS, **warp, **relative)
    if data.augment == "autoaugment":
        return auto_augment.auto_augment(images, policy_name="image_net", **warp, **relative)
    assert data.augment == "none", data.augment  # config.validate refuses any other name
    return images
