"""What a source is: the format names, the image extensions, and the items a source lists.

    auto              stanford-cars if the source holds the devkit (cars_meta.mat), else imagefolder
    imagefolder       root/<brand>/**/*.jpg or root/{train,val,test}/<brand>/**/*.jpg
    stanford-cars     the Stanford Cars devkit .mat files and their images

A leaf module: it imports nothing from carbrand but the errors, so every other module of
carbrand.prepare (and the predictor, for IMAGE_EXTENSIONS) may import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from carbrand.errors import UsageError

AUTO = "auto"
IMAGEFOLDER = "imagefolder"
STANFORD_CARS = "stanford-cars"
FORMATS = (AUTO, IMAGEFOLDER, STANFORD_CARS)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def check_format(name: str) -> str:
    """`name` if it is a format name; otherwise the one-line UsageError listing the valid ones."""
    if name not in FORMATS:
        raise UsageError(f"--format {name!r} is not one of: {', '.join(FORMATS)}")
    return name


@dataclass(frozen=True)
class SourceItem:
    path: Path  # absolute path of the image file
    brand: str
    given_split: str | None = None  # "train"/"val"/"test" when the source already fixes it
    box: tuple[int, int, int, int] | None = None  # x1, y1, x2, y2 (1-based, inclusive), Stanford Cars only
    car_model: str | None = None  # "Audi R8 Coupe 2012": the finer class inside the brand, Stanford Cars only
    linked_to: Path | None = None  # where a symbolic link (of the file or a folder above it) leads, when outside the root


@dataclass
class Source:
    format: str  # IMAGEFOLDER or STANFORD_CARS
    root: Path  # image paths are reported relative to this
    items: list[SourceItem]
    skipped: list[dict[str, str]] = field(default_factory=list)  # [{path, reason}] of files that are not images
    layout: str = "flat"  # "flat" (root/<brand>), "split" (root/<split>/<brand>) or "devkit"
