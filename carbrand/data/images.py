"""From a photo to model input, in one place for every path that reads images.

    load_rgb(path)        decode a file, EXIF orientation applied (as DALI's adjust_orientation does), RGB
    upright_rgb(image)    the same for a PIL image already open or in memory
    check_pixel_limits(paths)  header-only size check of many files (what DALI decodes)
    Normalizer            uint8 NHWC batch -> normalised NCHW on the device (data.mean/std; channels_last if asked)

The torchvision loaders, the predictor and prepare's verification decode through these;
DALI normalises inside its graph with the same numbers (data.mean, data.std), so a model
trained through DALI sees the same numbers when `carbrand predict` feeds it one photo.

The pixel limit is set once, by `prepare --max-pixels` (preprocessing.MAX_PIXELS by default), and
recorded in manifest.json; training carries it as data.max_pixels into the run's config and the
export's, so evaluate, predict and serve apply the very number prepare applied. Every path checks
it here, from the header, before anything is decoded (Pillow itself only refuses above
PILLOW_PIXEL_LIMIT, DALI never), with one message: over_pixel_limit's.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from carbrand.data import preprocessing
from carbrand.errors import DataError, first_line

# Header reads wait on the file system (a network one on clusters) far more than on Python.
HEADER_THREADS = 8
# Pillow's own hard refusal (twice its bomb warning, ~179 MP): no limit above it can be honoured.
PILLOW_PIXEL_LIMIT = 2 * Image.MAX_IMAGE_PIXELS


def pixel_limit(max_pixels: int) -> int:
    """data.max_pixels as a number: 0 (an export or config from before the limit travelled) is the default."""
    return max_pixels or preprocessing.MAX_PIXELS


def over_pixel_limit(width: int, height: int, max_pixels: int) -> str | None:
    """The one message for an image over the limit (prepare's reason; after the file name everywhere else)."""
    limit = pixel_limit(max_pixels)
    if width * height <= limit:
        return None
    return f"{width}x{height} = {width * height} pixels is over the limit of {limit} pixels (prepare --max-pixels)"


def upright_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, converted to RGB (grayscale, CMYK, palette and alpha images too)."""
    return ImageOps.exif_transpose(image).convert("RGB")


def load_rgb(path, max_pixels: int = 0) -> Image.Image:
    """Fully decode `path` (a truncated file fails here, not half-grey later) as upright RGB.

    An image over the pixel limit (data.max_pixels; 0 = the default) is a DataError naming the file, raised
    from the header before decoding.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit is checked instead
        image = open_within_pixel_limit(path, max_pixels)
    with image:
        image.load()
        return upright_rgb(image)


def open_within_pixel_limit(path, max_pixels: int = 0) -> Image.Image:
    """Image.open (which parses only the header), refusing more pixels than the limit."""
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:  # Pillow's own hard limit, at or above ours
        raise DataError(f"{path}: {first_line(error)} (the limit is {pixel_limit(max_pixels)} pixels)") from None
    problem = over_pixel_limit(image.width, image.height, max_pixels)
    if problem:
        image.close()
        raise DataError(f"{path}: {problem}")
    return image


def check_pixel_limits(paths: Sequence[str], max_pixels: int = 0) -> None:
    """Read each file's header (threads, no decoding); the first file over the pixel limit or unreadable is a DataError.

    For loaders that decode outside Python (DALI): about 50 ms per 1,000 cars5 photos on a warm cache.
    """
    with warnings.catch_warnings():  # set here, for the pool's threads: the filter list is per process
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=HEADER_THREADS) as pool:
            for _ in pool.map(partial(_check_header, max_pixels=max_pixels), paths):
                pass


def _check_header(path: str, max_pixels: int) -> None:
    try:
        open_within_pixel_limit(path, max_pixels).close()
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
        """NHWC -> NCHW; several eval crops per image, NKHWC -> NKCHW (each crop an NCHW image in memory)."""
        leading = batch.shape[:-3]
        images = batch.to(self.device, non_blocking=True).flatten(0, -4).permute(0, 3, 1, 2)  # channels_last view
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        # Normalise in float32 (one conversion that also sets the layout), then one cast.
        images = images.to(torch.float32, memory_format=layout).sub_(self.mean).mul_(self.inverse_std)
        return images.to(self.dtype).unflatten(0, leading)
