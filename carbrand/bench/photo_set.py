"""A benchmark set at realistic photo sizes, made from a prepared dataset.

The cars5 photos are small (about 290x175): decoding them costs so little that every
loader looks fast. Users train on camera and web photos of 500x375 to 1024x768 and
more, so `carbrand bench` re-encodes each photo at such a size, `copies` times (each
copy a slightly different crop, every other one mirrored, so no two files are the
same bytes), as JPEG quality 90 with 4:2:0 chroma, the way cameras and web sites save
them. The result is an ordinary prepared dataset: `carbrand train data.manifest=...`
reads it too.
"""

from __future__ import annotations

import argparse
import json
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from PIL import Image, ImageOps

from carbrand.data.images import load_rgb
from carbrand.data.manifest import load_prepared
from carbrand.errors import UsageError
from carbrand.prepare.manifest_writer import write_prepared
from carbrand.prepare.verify import default_workers

JPEG_QUALITY = 90


def parse_photo_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768); an argparse type, so a bad value is a usage error (exit 2)."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"photo size {text!r} is not WIDTHxHEIGHT, e.g. 1024x768") from None
    if not (16 <= width <= 8192 and 16 <= height <= 8192):
        raise argparse.ArgumentTypeError(f"photo size {text!r} must have sides between 16 and 8192 pixels")
    return width, height


def _reencode(job: tuple[str, str, int, int, int]) -> None:
    source, target, width, height, copy = job
    image = load_rgb(source)
    # copy k trims k% of the frame from alternating sides: a different picture, same subject
    trim_x, trim_y = image.width * copy // 100, image.height * copy // 100
    left, top = (trim_x, 0) if copy % 2 else (0, trim_y)
    image = image.crop((left, top, image.width - (trim_x - left), image.height - (trim_y - top)))
    if copy % 2:
        image = ImageOps.mirror(image)
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    image.save(target, "JPEG", quality=JPEG_QUALITY, subsampling="4:2:0")


def build_photo_set(manifest: Path, out: Path, size: tuple[int, int], copies: int, workers: int | None = None) -> Path:
    """Write (or reuse) the re-encoded prepared dataset in `out`; returns `out`."""
    if copies < 1:
        raise UsageError(f"--copies must be >= 1; got {copies}")
    source, out = load_prepared(manifest), out.resolve()
    width, height = size
    recipe = {"derived_from": str(source.directory.resolve()), "source": dataset_name(source.info, manifest), "photo_size": [width, height], "copies": copies,
              "jpeg_quality": JPEG_QUALITY}
    manifest_file = out / "manifest.json"
    if manifest_file.is_file() and json.loads(manifest_file.read_text()).get("benchmark_set") == recipe:
        return out  # already built from the same source and recipe
    if out.exists():
        shutil.rmtree(out)
    images = out / "images"
    jobs, splits = [], {}
    for split, samples in source.splits.items():
        splits[split] = []
        for index, sample in enumerate(samples):
            for copy in range(copies):
                target = images / split / f"{index:06d}-{copy:02d}.jpg"
                jobs.append((str(sample.path), str(target), width, height, copy))
                splits[split].append(replace(sample, path=target))
    for split in splits:
        (images / split).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=workers or default_workers()) as pool:
        list(pool.map(_reencode, jobs, chunksize=16))
    write_prepared(out, images, source.classes, splits, {"benchmark_set": recipe,
                                                         "totals": {k: len(v) for k, v in splits.items()}})
    return out


def describe(manifest: Path) -> str:
    """'cars5 photos as given' or 'cars5 re-encoded at 1024x768 (x4 copies)' for reports."""
    info = load_prepared(manifest).info
    recipe = info.get("benchmark_set")
    if recipe is None:
        return f"{dataset_name(info, manifest)} photos as prepared"
    width, height = recipe["photo_size"]
    return f"{recipe['source']} re-encoded at {width}x{height} (x{recipe['copies']} copies)"


def dataset_name(info: dict, manifest: Path) -> str:
    """The source folder's name (e.g. cars5), which says more than the prepared folder's."""
    return Path(info.get("source") or manifest).name


