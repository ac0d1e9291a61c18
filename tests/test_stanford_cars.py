"""Stanford Cars: the real devkit annotation files, and prepare on stand-in images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from tests.helpers.image_factory import write_jpeg
from tests.helpers.stanford_cars_devkit import STAND_IN_BOX, STAND_IN_SIZE, write_annotations, write_stand_in_devkit

from carbrand.errors import DataError
from carbrand.prepare.command import prepare_dataset
from carbrand.prepare.sources import detect_format
from carbrand.prepare.stanford_cars import make_of, read_annotations, read_class_names


def test_real_class_names_reduce_to_49_makes(devkit_dir):
    names = read_class_names(devkit_dir)
    assert len(names) == 196
    makes = {make_of(name) for name in names}
    assert len(makes) == 49
    assert {"AM General", "Aston Martin", "Land Rover", "Mercedes-Benz", "Rolls-Royce", "smart", "HUMMER", "Ram"} <= makes
    # No make is a prefix fragment of a multi-word make.
    assert not {"AM", "Aston", "Land", "General", "Martin", "Rover"} & makes
    assert make_of("AM General Hummer SUV 2000") == "AM General"
    assert make_of("Ram C/V Cargo Van Minivan 2012") == "Ram"
    assert make_of("Land Rover LR2 SUV 2012") == "Land Rover"


def test_real_training_annotations(devkit_dir):
    names = read_class_names(devkit_dir)
    annotations = read_annotations(devkit_dir / "cars_train_annos.mat", len(names))
    assert len(annotations) == 8144
    assert annotations[0].fname == "00001.jpg" and annotations[-1].fname == "08144.jpg"
    assert annotations[0].box == (39, 116, 569, 375)
    assert make_of(names[annotations[0].class_index]) == "Audi"  # class 14: Audi TTS Coupe 2012
    assert len({make_of(names[a.class_index]) for a in annotations}) == 49


def test_unlabelled_test_annotations_are_refused(devkit_dir):
    with pytest.raises(DataError, match="lack the field.*class"):
        read_annotations(devkit_dir / "cars_test_annos.mat", 196)


@pytest.fixture
def stand_in(devkit_dir, tmp_path):
    """A devkit with 36 of the real training annotations (12 each of three makes) and stand-in JPEGs."""
    return write_stand_in_devkit(devkit_dir, tmp_path)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_meta_written_by_the_test_reads_like_the_real_one(stand_in, devkit_dir):
    devkit, _, _ = stand_in
    assert read_class_names(devkit) == read_class_names(devkit_dir)


def test_prepare_stand_in_images(stand_in, tmp_path):
    devkit, images, rows = stand_in
    assert detect_format(devkit) == "stanford-cars"
    summary = prepare_dataset(devkit, tmp_path / "out", images=images, quiet=True, workers=2)
    assert summary.classes == ["Aston Martin", "BMW", "Land Rover"]
    assert {split: sum(c.values()) for split, c in summary.counts.items()} == {"train": 30, "val": 3, "test": 3}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["format"] == "stanford-cars" and manifest["root"] == str(images.resolve())
    assert read_csv(tmp_path / "out" / "train.csv")[0]["path"].startswith("cars_train/")


def test_prepare_with_crops(stand_in, tmp_path):
    devkit, images, _ = stand_in
    out = tmp_path / "out"
    prepare_dataset(devkit, out, images=images, crop_boxes=True, quiet=True, workers=2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["root"] == str((out / "crops").resolve())
    rows = read_csv(out / "train.csv")
    from PIL import Image

    with Image.open(out / "crops" / rows[0]["path"]) as crop:
        assert crop.size == (100, 70)
    assert manifest["image_sizes"]["min_short_side"] == 70


def test_images_directly_in_the_images_folder(stand_in, tmp_path):
    devkit, images, rows = stand_in
    for _, _, fname in rows:
        (images / "cars_train" / fname).rename(images / fname)
    (images / "cars_train").rmdir()
    summary = prepare_dataset(devkit, tmp_path / "out", images=images, quiet=True, workers=2)
    assert summary.total("train") + summary.total("val") + summary.total("test") == 36


def test_labelled_test_file_becomes_the_test_split(stand_in, tmp_path):
    devkit, images, rows = stand_in
    test_rows = [(STAND_IN_BOX, label, f"t{k:05d}.jpg") for k, (_, label, _) in enumerate(rows[::4])]
    write_annotations(devkit / "cars_test_annos_withlabels.mat", test_rows)
    for k, (_, _, fname) in enumerate(test_rows):
        write_jpeg(images / "cars_test" / fname, 500 + k, STAND_IN_SIZE)
    summary = prepare_dataset(devkit, tmp_path / "out", images=images, quiet=True, workers=2)
    tested = [row["path"] for row in read_csv(tmp_path / "out" / "test.csv")]
    assert sorted(tested) == sorted(f"cars_test/{fname}" for _, _, fname in test_rows)
    assert summary.total("train") + summary.total("val") == 36


def test_missing_images_are_counted_and_named(stand_in, tmp_path):
    devkit, images, rows = stand_in
    for _, _, fname in rows[:5]:
        (images / "cars_train" / fname).unlink()
    with pytest.raises(DataError, match=rf"5 of 36 annotated images are missing under .*\(e\.g\. cars_train/{rows[0][2]}, "):
        prepare_dataset(devkit, tmp_path / "out", images=images, quiet=True)


def test_no_image_folder_asks_for_images(stand_in, tmp_path):
    devkit, _, _ = stand_in
    from carbrand.errors import UsageError

    with pytest.raises(UsageError, match="--images"):
        prepare_dataset(devkit, tmp_path / "out", quiet=True)
