"""The Stanford Cars devkit: 196 "Make Model Year" classes reduced to their 49 makes, each image keeping its class.

    DEVKIT/cars_meta.mat                    class_names: 196 strings, e.g. "Aston Martin V8 Vantage Coupe 2012"
    DEVKIT/cars_train_annos.mat             8,144 labelled annotations (bbox_x1..bbox_y2, class, fname)
    DEVKIT/cars_test_annos.mat              8,041 annotations without labels (not usable for training)
    DEVKIT/cars_test_annos_withlabels.mat   optional: the labelled test annotations, kept as the test split
    IMAGES/cars_train/*.jpg  IMAGES/cars_test/*.jpg   (or the training images directly in IMAGES)

Without the labelled test file the labelled training annotations are split into
train/val/test. Bounding boxes are 1-based and inclusive (MATLAB convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carbrand.data.manifest import safe_relative_path
from carbrand.errors import DataError, UsageError
from carbrand.prepare.formats import STANFORD_CARS, Source, SourceItem

META_FILE = "cars_meta.mat"
TRAIN_ANNOTATIONS = "cars_train_annos.mat"
TEST_ANNOTATIONS = "cars_test_annos.mat"
LABELLED_TEST_ANNOTATIONS = "cars_test_annos_withlabels.mat"

# Makes whose name is more than one word; every other class name starts with a one-word make
# ("Mercedes-Benz", "Rolls-Royce" are one word). Checked against all 196 real class names.
MULTI_WORD_MAKES = ("AM General", "Aston Martin", "Land Rover")


@dataclass(frozen=True)
class Annotation:
    fname: str
    class_index: int  # 0-based index into the 196 class names
    box: tuple[int, int, int, int]  # x1, y1, x2, y2, 1-based inclusive


def make_of(class_name: str) -> str:
    """'Aston Martin V8 Vantage Coupe 2012' -> 'Aston Martin'; 'BMW M3 Coupe 2012' -> 'BMW'."""
    for make in MULTI_WORD_MAKES:
        if class_name == make or class_name.startswith(make + " "):
            return make
    return class_name.split()[0]


def find_devkit(source: Path) -> Path | None:
    """The folder holding cars_meta.mat: SOURCE itself or SOURCE/devkit (the archive's layout)."""
    for candidate in (source, source / "devkit"):
        if (candidate / META_FILE).is_file():
            return candidate
    return None


def _loadmat(path: Path) -> dict:
    from scipy.io import loadmat

    if not path.is_file():
        raise DataError(f"{path} is missing (the Stanford Cars devkit needs {META_FILE} and {TRAIN_ANNOTATIONS})")
    try:
        return loadmat(str(path))
    except (ValueError, OSError, TypeError) as error:
        raise DataError(f"{path} is not a readable MATLAB file: {error}") from None


def read_class_names(devkit: Path) -> list[str]:
    path = devkit / META_FILE
    meta = _loadmat(path)
    if "class_names" not in meta:
        raise DataError(f"{path} has no 'class_names' variable")
    names = [str(np.asarray(cell).ravel()[0]).strip() for cell in np.asarray(meta["class_names"]).ravel()]
    if not names or not all(names):
        raise DataError(f"{path}: 'class_names' is empty or holds an empty name")
    return names


def read_annotations(path: Path, class_count: int) -> list[Annotation]:
    """Labelled annotations; raises DataError for an unlabelled file (cars_test_annos.mat)."""
    data = _loadmat(path)
    if "annotations" not in data:
        raise DataError(f"{path} has no 'annotations' variable")
    records = np.asarray(data["annotations"]).ravel()
    fields = records.dtype.names or ()
    needed = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    missing = [name for name in needed if name not in fields]
    if missing:
        raise DataError(f"{path}: annotations lack the field(s) {', '.join(missing)} (an unlabelled test file cannot be used for training)")
    annotations = []
    for number, record in enumerate(records, start=1):
        label = _scalar(record["class"])
        if not 1 <= label <= class_count:
            raise DataError(f"{path}: annotation {number} has class {label}, outside 1..{class_count}")
        box = tuple(_scalar(record[key]) for key in needed[:4])
        annotations.append(Annotation(fname=str(np.asarray(record["fname"]).ravel()[0]), class_index=label - 1, box=box))
    return annotations


def _scalar(value: object) -> int:
    return int(np.asarray(value).ravel()[0])


def _image_folder(images: Path, subfolder: str, required: bool) -> Path | None:
    if (images / subfolder).is_dir():
        return images / subfolder
    if required:
        raise DataError(f"{images / subfolder} is missing (the labelled test annotations need the test images there)")
    return None


def resolve_images_dir(devkit: Path, images: Path | None) -> Path:
    if images is not None:
        if not images.is_dir():
            raise DataError(f"--images {images} is not a directory")
        return images
    # The archives unpack next to the devkit folder; look there before asking for --images.
    for candidate in (devkit, devkit.parent):
        if (candidate / "cars_train").is_dir():
            return candidate
    raise UsageError(f"no cars_train/ folder next to {devkit}: pass --images DIR (the folder holding cars_train/ and cars_test/)")


def discover_stanford_cars(source: Path, images: Path | None) -> Source:
    devkit = find_devkit(source)
    if devkit is None:
        raise DataError(f"{source} is not a Stanford Cars devkit: {META_FILE} not found in it or in {source / 'devkit'}")
    class_names = read_class_names(devkit)
    images = resolve_images_dir(devkit, images)
    train_folder = _image_folder(images, "cars_train", required=False) or images
    items = [_item(train_folder, a, class_names, None) for a in read_annotations(devkit / TRAIN_ANNOTATIONS, len(class_names))]
    labelled_test = devkit / LABELLED_TEST_ANNOTATIONS
    if labelled_test.is_file():
        test_folder = _image_folder(images, "cars_test", required=True)
        items += [_item(test_folder, a, class_names, "test") for a in read_annotations(labelled_test, len(class_names))]
    _require_files(items, images)
    return Source(format=STANFORD_CARS, root=images, items=items, skipped=[], layout="devkit")


def _item(folder: Path, annotation: Annotation, class_names: list[str], split: str | None) -> SourceItem:
    return SourceItem(
        path=safe_relative_path(folder, annotation.fname, f"Stanford Cars annotation {annotation.fname!r}"),
        brand=make_of(class_names[annotation.class_index]),
        given_split=split,
        box=annotation.box,
        car_model=class_names[annotation.class_index],
    )


def _require_files(items: list[SourceItem], images: Path) -> None:
    missing = [item.path for item in items if not item.path.is_file()]
    if missing:
        examples = ", ".join(p.relative_to(images).as_posix() for p in missing[:3])
        raise DataError(f"{len(missing)} of {len(items)} annotated images are missing under {images} (e.g. {examples})")
