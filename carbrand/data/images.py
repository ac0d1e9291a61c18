"""From a photo to model input, in one place for every path that reads images.

    load_rgb(path)        decode a file, EXIF orientation applied (as DALI's adjust_orientation does), RGB
    upright_rgb(image)    the same for a PIL image already open or in memory
    Normalizer            uint8 NHWC batch -> ImageNet-normalised NCHW on the device (channels_last if asked)

The torchvision loaders, the predictor and prepare's verification decode through these;
DALI normalises inside its graph with the same constants (preprocessing.py), so a model
trained through DALI sees the same numbers when `carbrand predict` feeds it one photo.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

from carbrand.data.preprocessing import IMAGENET_MEAN_255, IMAGENET_STD_255


def upright_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, converted to RGB (grayscale, CMYK, palette and alpha images too)."""
    return ImageOps.exif_transpose(image).convert("RGB")


def load_rgb(path) -> Image.Image:
    """Fully decode `path` (a truncated file fails here, not half-grey later) as upright RGB."""
    with Image.open(path) as image:
        image.load()
        return upright_rgb(image)


def hwc_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 HWC tensor of an RGB image (what loader workers send: a quarter of float32's bytes)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())


class Normalizer:
    """uint8 NHWC batch -> normalised `dtype` NCHW on `device`, channels_last when asked.

    Normalisation runs on the device, on the 0-255 scale, after the copy: the NHWC batch
    permuted to NCHW is channels_last for free.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, channels_last: bool):
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        self.mean = torch.tensor(IMAGENET_MEAN_255, device=device).view(1, 3, 1, 1)
        self.inverse_std = (1.0 / torch.tensor(IMAGENET_STD_255, device=device)).view(1, 3, 1, 1)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        images = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # channels_last view
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        # Normalise in float32 (one conversion that also sets the layout), then one cast.
        images = images.to(torch.float32, memory_format=layout).sub_(self.mean).mul_(self.inverse_std)
        return images.to(self.dtype)
