"""The preprocessing numbers every image path shares: DALI, torchvision and the predictor.

Keeping them in one place is what makes the three paths agree: a model trained through
DALI must see the same normalisation and eval crop when `carbrand predict` feeds it
a single photo through PIL.
"""

from __future__ import annotations

# The one pixel limit: prepare rejects larger images, and every path that reads one refuses it
# from the header, before decoding (images.py). Below Pillow's own bomb warning (89.5 MP);
# larger is not a car photo.
MAX_PIXELS = 80_000_000

# ImageNet statistics, because the backbone starts from ImageNet weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The same numbers on the 0-255 scale of decoded uint8 pixels (DALI normalises there,
# and the torchvision path normalises uint8 batches on the device the same way).
IMAGENET_MEAN_255 = tuple(255.0 * m for m in IMAGENET_MEAN)
IMAGENET_STD_255 = tuple(255.0 * s for s in IMAGENET_STD)

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


def eval_crop_box(width: int, height: int, image_size: int, crop_fraction: float) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the source square the eval crop shows, in pixels.

    "Resize the shorter side to R, then centre-crop S" is exactly "resize this centred
    square of side shorter * S / R to S x S". Computed in floating point, so PIL
    (`Image.resize(box=...)`) and DALI (`fn.resize(roi_start, roi_end)`) see the same
    region and no implementation's rounding of sizes or offsets shifts the picture.
    """
    side = min(width, height) * eval_crop_side_fraction(image_size, crop_fraction)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side
