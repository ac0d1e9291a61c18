"""The preprocessing numbers every image path shares: DALI, torchvision and the predictor.

Keeping them in one place is what makes the three paths agree: a model trained through
DALI must see the same eval crop (and, from the config, the same normalisation) when `carbrand predict` feeds it
a single photo through PIL.
"""

from __future__ import annotations

# The default pixel limit (`prepare --max-pixels`, which manifest.json records and training carries
# into the export as data.max_pixels): every path that reads an image refuses a larger one from its
# header, before decoding (images.py). Below Pillow's own bomb warning (89.5 MP); larger is rarely
# a car photo.
MAX_PIXELS = 80_000_000

# The normalisation is not here but in the config (data.mean, data.std: what the weights expect,
# ImageNet's statistics by default), so that it travels with the export into predict and serve.
# DALI and the torchvision path both normalise on the 0-255 scale of decoded uint8 pixels.


def on_255_scale(values) -> list[float]:
    """data.mean / data.std (0-1 scale) on the 0-255 scale of decoded uint8 pixels."""
    return [255.0 * value for value in values]

# RandomResizedCrop aspect-ratio range (width / height), the torchvision default.
TRAIN_ASPECT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Tries to find a crop inside the image before falling back to a centre crop.
TRAIN_CROP_ATTEMPTS = 100


def eval_resize_size(image_size: int, crop_fraction: float) -> int:
    """Shorter side before the centre crop: 224 / 0.875 = 256, the classic recipe."""
    return round(image_size / crop_fraction)


def eval_crop_side_fraction(image_size: int, crop_fraction: float) -> float:
    """Side of the eval crop as a fraction of the image's shorter side (S / R)."""
    return image_size / eval_resize_size(image_size, crop_fraction)


def eval_crop_positions(crops: int) -> list[float]:
    """Where each eval crop sits along the image's longer side: 0 the start, 1 the end; one crop is centred."""
    return [0.5] if crops == 1 else [k / (crops - 1) for k in range(crops)]


def eval_crop_boxes(width: int, height: int, image_size: int, crop_fraction: float,
                    crops: int = 1) -> list[tuple[float, float, float, float]]:
    """(left, top, right, bottom) of the source square of each eval crop, in pixels.

    "Resize the shorter side to R, then centre-crop S" is exactly "resize this centred
    square of side shorter * S / R to S x S". Several crops: that same crop of each of `crops`
    squares of the full shorter side, spread evenly from one end of the longer side to the other
    (left, centre and right of a landscape photo), so that a car away from the middle of a wide
    street photo is still seen whole by one of them. Computed in floating point, so PIL
    (`Image.resize(box=...)`) and DALI (`fn.resize(roi_start, roi_end)`) see the same
    region and no implementation's rounding of sizes or offsets shifts the picture.
    """
    shorter = min(width, height)
    side = shorter * eval_crop_side_fraction(image_size, crop_fraction)
    boxes = []
    for position in eval_crop_positions(crops):
        left = (width - side) / 2 + (position - 0.5) * (width - shorter)  # the shorter side's term is 0
        top = (height - side) / 2 + (position - 0.5) * (height - shorter)
        boxes.append((left, top, left + side, top + side))
    return boxes


def eval_crop_box(width: int, height: int, image_size: int, crop_fraction: float) -> tuple[float, float, float, float]:
    """The centre crop's source square (eval_crop_boxes with one crop)."""
    return eval_crop_boxes(width, height, image_size, crop_fraction)[0]
