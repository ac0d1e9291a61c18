"""`carbrand prepare` and `carbrand evaluate` flags that README promises, through the command line itself
(`carbrand.cli.main`, what the console script runs: the argument parser and its wiring), not the Python API.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from carbrand.cli import main as carbrand
from tests.helpers.image_factory import write_brand_tree, write_jpeg, write_text, write_truncated_jpeg
from tests.helpers.stanford_cars_devkit import write_stand_in_devkit


def prepare(*arguments) -> int:
    return carbrand(["prepare", *[str(a) for a in arguments], "--quiet", "--workers", "2"])


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def rejected(out: Path) -> dict[str, str]:
    return {entry["path"]: entry["reason"] for entry in manifest(out)["rejected"]}


def split_rows(out: Path, split: str) -> list[dict[str, str]]:
    with (out / f"{split}.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_min_side_and_max_pixels_flags(tmp_path):
    source = tmp_path / "source"
    write_brand_tree(source, {"alfa": 3, "brio": 3})  # 120 x 90
    write_jpeg(source / "alfa" / "small.jpg", seed=50, size=(100, 60))
    write_jpeg(source / "brio" / "large.jpg", seed=51, size=(300, 300))
    assert prepare(source, "--out", tmp_path / "strict", "--min-side", "70", "--max-pixels", "50000") == 0
    assert rejected(tmp_path / "strict") == {"alfa/small.jpg": "too small: 100x60, short side below min_side 70",
                                            "brio/large.jpg": "too many pixels: 300x300 = 90000 pixels is over the limit of 50000 "
                                                              "pixels (prepare --max-pixels)"}
    assert (manifest(tmp_path / "strict")["min_side"], manifest(tmp_path / "strict")["max_pixels"]) == (70, 50_000)
    assert prepare(source, "--out", tmp_path / "lenient", "--min-side", "50", "--max-pixels", "100000") == 0
    assert rejected(tmp_path / "lenient") == {}


def test_keep_leaked_flag(tmp_path):
    source = tmp_path / "source"
    write_brand_tree(source / "train", {"alfa": 8, "brio": 8})
    write_brand_tree(source / "test", {"alfa": 2, "brio": 2}, first_seed=1000)
    shutil.copy(source / "test" / "brio" / "brio_01.jpg", source / "train" / "brio" / "leaked.jpg")
    assert prepare(source, "--out", tmp_path / "removed", "--min-side", "64") == 0
    kept_paths = {row["path"] for split in ("train", "val") for row in split_rows(tmp_path / "removed", split)}
    assert "train/brio/leaked.jpg" not in kept_paths
    assert [e["path"] for e in manifest(tmp_path / "removed")["leakage_removed"]] == ["train/brio/leaked.jpg"]

    assert prepare(source, "--out", tmp_path / "kept", "--min-side", "64", "--keep-leaked") == 0
    kept_paths = {row["path"] for split in ("train", "val") for row in split_rows(tmp_path / "kept", split)}
    assert "train/brio/leaked.jpg" in kept_paths
    assert manifest(tmp_path / "kept")["leakage_removed"] == []
    assert [e["path"] for e in manifest(tmp_path / "kept")["leakage_kept"]] == ["train/brio/leaked.jpg"]


def test_format_stanford_cars_flag(devkit_dir, tmp_path, capsys):
    devkit, images, rows = write_stand_in_devkit(devkit_dir, tmp_path / "stanford", per_make=6)
    out = tmp_path / "out"
    assert prepare(devkit, "--format", "stanford-cars", "--images", images, "--out", out, "--min-side", "64") == 0
    assert manifest(out)["format"] == "stanford-cars" and manifest(out)["root"] == str(images.resolve())
    assert json.loads((out / "classes.json").read_text()) == ["Aston Martin", "BMW", "Land Rover"]
    assert sum(len(split_rows(out, split)) for split in ("train", "val", "test")) == len(rows) == 18

    # An image-folder tree, which `auto` would take as one: the flag makes prepare look for the devkit's files.
    folder = tmp_path / "folder"
    write_brand_tree(folder, {"alfa": 2, "brio": 2})
    capsys.readouterr()
    assert prepare(folder, "--format", "stanford-cars", "--out", tmp_path / "not_devkit") != 0
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("carbrand prepare: error: ") and "cars_meta.mat" in error, error
    assert not (tmp_path / "not_devkit" / "manifest.json").exists()


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_evaluate_on_a_raw_folder_applies_prepares_rules(fitted_cars5_export, cars5_dir, tmp_path, capsys):
    raw = tmp_path / "raw"
    for brand in ("audi", "bmw", "ferrari"):
        for photo in sorted((cars5_dir / "test" / brand).glob("*.jpg"))[:3]:
            (raw / brand).mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, raw / brand / photo.name)
    write_truncated_jpeg(raw / "audi" / "cut.jpg", seed=7)  # a download that stopped halfway
    write_text(raw / "bmw" / "notes.jpg")  # text under an image name
    out = tmp_path / "out"
    capsys.readouterr()
    assert carbrand(["evaluate", "--checkpoint", str(fitted_cars5_export), "--data", str(raw), "--out", str(out),
                     "--batch-size", "4"]) == 0
    warning = capsys.readouterr().err
    assert f"2 file(s) under {raw} rejected, e.g. audi/cut.jpg: truncated image" in warning, warning
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data_kind"] == "raw flat image folder"
    assert metrics["split_samples"] == metrics["samples"] == 9
    with (out / "predictions.csv").open(newline="", encoding="utf-8") as handle:
        scored = sorted(Path(row["path"]).name for row in csv.DictReader(handle))
    assert scored == sorted(p.name for p in raw.glob("*/*.jpg") if p.name not in ("cut.jpg", "notes.jpg"))


@pytest.mark.parametrize("root", ["/", "~", "/proc", "/sys/kernel", "/dev", "/usr", "/home/../"])
def test_absurd_sources_are_refused_before_anything_is_scanned(root, tmp_path, monkeypatch, capsys):
    source = Path(root).expanduser()
    named = source.resolve()  # the path prepare works on: /home/../ is /

    def no_scanning(*arguments, **keywords):
        raise AssertionError(f"{source} was scanned")

    for name in ("iterdir", "rglob", "glob"):
        monkeypatch.setattr(Path, name, no_scanning)
    monkeypatch.setattr("os.scandir", no_scanning)
    monkeypatch.setattr("os.walk", no_scanning)
    assert carbrand(["prepare", str(source), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"carbrand prepare: error: source {named} "), error
    assert "not scanned" in error and not (tmp_path / "out").exists(), error


def test_a_source_with_far_too_many_top_level_entries_is_refused_before_discovery(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("carbrand.prepare.sources.MAX_TOP_LEVEL_ENTRIES", 20)
    source = tmp_path / "dump"
    source.mkdir()
    for index in range(21):
        (source / f"{index}.jpg").touch()

    def no_discovery(*arguments, **keywords):
        raise AssertionError("the source was scanned")

    monkeypatch.setattr("carbrand.prepare.sources.discover_imagefolder", no_discovery)
    assert prepare(source, "--out", tmp_path / "out") == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"carbrand prepare: error: source {source} has more than 20 entries at its top level: not scanned; "
                     f"a source is the folder that holds the brand folders (or train/val/test), or the Stanford Cars devkit")
