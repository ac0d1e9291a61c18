"""From a photo to model input, in one place for every path that reads images.

    load_rgb(path)        decode a file, EXIF orientation applied (as DALI's adjust_orientation does), RGB
    upright_rgb(image)    the same for a PIL image already open or in memory
    check_pixel_limits(paths)  header-only size check of many files (what DALI decodes)
    Normalizer            uint8 NHWC batch -> normalised NCHW on the device (data.mean/std; channels_last if asked)

The torchvision loaders, the predictor and prepare's verification decode through these;
DALI normalises inside its graph with the same numbers (data.mean, data.std), so a model
trained through DALI sees the same numbers when `carbrand predict` feeds it one photo.

preprocessing.MAX_PIXELS is the one pixel limit: prepare rejects larger images, and load_rgb
and the DALI loaders refuse them from the header, before anything is decoded (Pillow itself
only refuses above about 179 MP, DALI never).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from carbrand.data import preprocessing
from carbrand.errors import DataError, first_line

# Header reads wait on the file system (a network one on clusters) far more than on Python.
HEADER_THREADS = 8


def upright_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, converted to RGB (grayscale, CMYK, palette and alpha images too)."""
    return ImageOps.exif_transpose(image).convert("RGB")


def load_rgb(path) -> Image.Image:
    """Fully decode `path` (a truncated file fails here, not half-grey later) as upright RGB.

    An image over the pixel limit is a DataError naming the file, raised from the header before decoding.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit, lower, is checked instead
        image = open_within_pixel_limit(path)
    with image:
        image.load()
        return upright_rgb(image)


def open_within_pixel_limit(path) -> Image.Image:
    """Image.open (which parses only the header), refusing more than preprocessing.MAX_PIXELS pixels."""
    limit = preprocessing.MAX_PIXELS  # read at each call: one constant, wherever it is set
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:  # Pillow's own hard limit, far above ours
        raise DataError(f"{path}: {first_line(error)} (the limit is {limit} pixels)") from None
    width, height = image.size
    if width * height > limit:
        image.close()
        raise DataError(f"{path}: {width}x{height} = {width * height} pixels is over the limit of {limit} pixels")
    return image


def check_pixel_limits(paths: Sequence[str]) -> None:
    """Read each file's header (threads, no decoding); the first file over the pixel limit or unreadable is a DataError.

    For loaders that decode outside Python (DALI): about 50 ms per 1,000 cars5 photos on a warm cache.
    """
    with warnings.catch_warnings():  # set here, for the pool's threads: the filter list is per process
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=HEADER_THREADS) as pool:
            for _ in pool.map(_check_header, paths):
                pass


def _check_header(path: str) -> None:
    try:
        open_within_pixel_limit(path).close()
    except (OSError, UnidentifiedImageError) as error:
        raise DataError(f"{path}: cannot read the image header ({type(error).__name__}: {first_line(error)})") from None


def hwc_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 HWC tensor of an RGB image (what loader workers send: a quarter of float32's bytes)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())


class Normalizer:
    """uint8 NHWC batch -> normalised `dtype` NCHW on `device`, channels_last when asked.

    Normalisation runs on the device, on the 0-255 scale, after the copy: the NHWC batch
    permuted to NCHW is channels_last for free.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, channels_last: bool, *, mean: Sequence[float],
                 std: Sequence[float]):
        """`mean` and `std` on the 0-1 scale (data.mean, data.std: what the weights expect)."""
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        self.mean = torch.tensor(preprocessing.on_255_scale(mean), device=device).view(1, 3, 1, 1)
        self.inverse_std = (1.0 / torch.tensor(preprocessing.on_255_scale(std), device=device)).view(1, 3, 1, 1)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        images = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # channels_last view
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        # Normalise in float32 (one conversion that also sets the layout), then one cast.
        images = images.to(torch.float32, memory_format=layout).sub_(self.mean).mul_(self.inverse_std)
        return images.to(self.dtype)
