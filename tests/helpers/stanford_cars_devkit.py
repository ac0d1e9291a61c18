"""A small Stanford Cars devkit for prepare: the real class names and training annotations, stand-in JPEGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.io import savemat

from carbrand.prepare.stanford_cars import make_of, read_annotations, read_class_names
from tests.helpers.image_factory import write_jpeg

STAND_IN_SIZE = (160, 120)
STAND_IN_BOX = (11, 21, 110, 90)  # 1-based inclusive: a 100 x 70 crop


def write_annotations(path: Path, rows: list[tuple[tuple[int, int, int, int], int, str]]) -> None:
    """rows of (box, 1-based class, fname), written like the devkit's struct array."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    records = np.empty((1, len(rows)), dtype=[(name, "O") for name in fields])
    for k, (box, label, fname) in enumerate(rows):
        records[0, k] = (*[np.array([[v]], dtype=np.uint16) for v in box], np.array([[label]], dtype=np.uint8), np.array([fname]))
    savemat(str(path), {"annotations": records})


def write_stand_in_devkit(real_devkit: Path, folder: Path, per_make: int = 12,
                          makes: tuple[str, ...] = ("Aston Martin", "BMW", "Land Rover")):
    """folder/devkit with `per_make` of the real training annotations of each make, and folder/images/cars_train/
    with a stand-in JPEG for each. Returns (devkit, images, rows)."""
    names = read_class_names(real_devkit)
    annotations = read_annotations(real_devkit / "cars_train_annos.mat", len(names))
    wanted = {make: [] for make in makes}
    for annotation in annotations:
        chosen = wanted.get(make_of(names[annotation.class_index]))
        if chosen is not None and len(chosen) < per_make:
            chosen.append(annotation)
    devkit = folder / "devkit"
    devkit.mkdir(parents=True)
    savemat(str(devkit / "cars_meta.mat"), {"class_names": np.array([[np.array([n]) for n in names]], dtype=object)})
    rows = [(STAND_IN_BOX, a.class_index + 1, a.fname) for chosen in wanted.values() for a in chosen]
    write_annotations(devkit / "cars_train_annos.mat", rows)
    images = folder / "images"
    for seed, (_, _, fname) in enumerate(rows):
        write_jpeg(images / "cars_train" / fname, seed, STAND_IN_SIZE)
    return devkit, images, rows
