"""A small, deterministic stand-in dataset for `carbrand demo` -- not car photos.

Each fictional brand is a coloured silhouette with its own shape, hue and stripe
pattern, drawn at a random position, scale and angle on a noisy, randomly tinted
background with a few grey distractor blobs. The class cue survives random resized
crops and flips, so a small CNN learns it in a couple of CPU minutes at 64-96 px.

    out_dir/train/<brand>/<brand>_000.jpg   out_dir/test/<brand>/<brand>_000.jpg
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


@dataclass(frozen=True)
class DemoBrand:
    name: str
    shape: str  # ellipse | triangle | diamond | star | bar
    colour: tuple[int, int, int]
    stripes: int  # white stripes across the silhouette (0 = plain)


BRANDS = (
    DemoBrand("aurora", "ellipse", (220, 40, 40), 0),
    DemoBrand("bolt", "triangle", (240, 200, 20), 2),
    DemoBrand("comet", "diamond", (40, 90, 230), 3),
    DemoBrand("dune", "bar", (230, 130, 30), 4),
    DemoBrand("ember", "star", (40, 180, 70), 0),
)


def make_demo_dataset(
    out_dir: str | Path,
    images_per_class: int = 48,
    test_images_per_class: int = 16,
    image_size: int = 144,
    seed: int = 0,
    brands: int = len(BRANDS),
) -> Path:
    """Write the train/test tree and return `out_dir`; the same seed gives the same bytes."""
    out_dir = Path(out_dir)
    if not 2 <= brands <= len(BRANDS):
        raise ValueError(f"brands must be in 2..{len(BRANDS)}, got {brands}")
    for split, count in (("train", images_per_class), ("test", test_images_per_class)):
        for brand_index, brand in enumerate(BRANDS[:brands]):
            folder = out_dir / split / brand.name
            folder.mkdir(parents=True, exist_ok=True)
            for number in range(count):
                # One generator per image: the picture does not depend on how many others were drawn.
                rng = random.Random(f"{seed}/{split}/{brand.name}/{number}")
                draw_example(brand, image_size, rng).save(folder / f"{brand.name}_{number:03d}.jpg", quality=90)
    return out_dir


def draw_example(brand: DemoBrand, size: int, rng: random.Random) -> Image.Image:
    image = _background(size, rng)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):  # distractors: grey blobs that carry no class information
        radius = rng.uniform(0.05, 0.12) * size
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        grey = rng.randint(60, 200)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(grey, grey, grey))
    silhouette = _silhouette(brand, size, rng)
    image.paste(_jitter(brand.colour, rng), mask=silhouette)
    if brand.stripes:
        image.paste((250, 250, 250), mask=_stripes(silhouette, brand.stripes, rng))
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 10, (size, size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def _background(size: int, rng: random.Random) -> Image.Image:
    top = np.array([rng.randint(70, 200) for _ in range(3)], dtype=np.float32)
    bottom = np.array([rng.randint(70, 200) for _ in range(3)], dtype=np.float32)
    ramp = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    gradient = top * (1 - ramp) + bottom * ramp
    return Image.fromarray(np.broadcast_to(gradient, (size, size, 3)).astype(np.uint8))


def _silhouette(brand: DemoBrand, size: int, rng: random.Random) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    radius = rng.uniform(0.22, 0.34) * size  # large enough to survive a random resized crop
    cx = rng.uniform(radius, size - radius)
    cy = rng.uniform(radius, size - radius)
    angle = rng.uniform(0, 2 * math.pi)
    draw = ImageDraw.Draw(mask)
    if brand.shape == "ellipse":
        draw.ellipse((cx - radius, cy - radius * 0.7, cx + radius, cy + radius * 0.7), fill=255)
    else:
        draw.polygon(_polygon(brand.shape, cx, cy, radius, angle), fill=255)
    return mask


def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        radii, corners = [radius], 3
    elif shape == "diamond":
        radii, corners = [radius, radius * 0.55], 2
    elif shape == "star":
        radii, corners = [radius, radius * 0.45], 5
    elif shape == "bar":
        radii, corners = [radius, radius * 0.45, radius, radius * 0.45], 1
    else:
        raise ValueError(f"unknown shape {shape!r}")
    count = corners * len(radii)
    return [
        (cx + radii[k % len(radii)] * math.cos(angle + 2 * math.pi * k / count), cy + radii[k % len(radii)] * math.sin(angle + 2 * math.pi * k / count))
        for k in range(count)
    ]


def _stripes(silhouette: Image.Image, count: int, rng: random.Random) -> Image.Image:
    size = silhouette.width
    stripes = Image.new("L", silhouette.size, 0)
    draw = ImageDraw.Draw(stripes)
    period = size / (count * 2 + 1)
    offset = rng.uniform(0, period)
    for k in range(count * 3):  # cover the whole canvas; the silhouette mask cuts them to shape
        x = offset + k * 2 * period * 0.5
        draw.rectangle((x, 0, x + period * 0.35, size), fill=255)
    vertical = stripes.rotate(rng.uniform(0, 180))
    return Image.fromarray(np.minimum(np.asarray(vertical), np.asarray(silhouette)))


def _jitter(colour: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, channel + rng.randint(-25, 25)))) for channel in colour)
