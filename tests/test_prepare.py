"""`carbrand prepare` on real files: broken and odd images, splits, duplicates, cars5, the CLI."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from carbrand import cli
from carbrand.data.manifest import load_prepared
from carbrand.errors import DataError, UsageError
from carbrand.prepare.command import prepare_dataset
from carbrand.prepare.verify import Limits, VerifyTask, check_image
from tests.helpers.image_factory import (
    photo,
    write_brand_tree,
    write_exif_rotated,
    write_huge_header_png,
    write_jpeg,
    write_png_named_jpg,
    write_text,
    write_truncated_jpeg,
    write_zero_bytes,
)


def prepare(source: Path, out: Path, **options):
    return prepare_dataset(source, out, quiet=True, workers=2, **options)


def split_of(out: Path) -> dict[str, str]:
    """Relative image path -> split, read back from the CSVs."""
    splits = {}
    for name in ("train", "val", "test"):
        with (out / f"{name}.csv").open(newline="", encoding="utf-8") as handle:
            splits.update({row["path"]: name for row in csv.DictReader(handle)})
    return splits


def reasons(summary) -> dict[str, str]:
    return {entry["path"]: entry["reason"] for entry in summary.rejected}


# --- bad input is rejected with a reason, never silently dropped ---------------------------------


def test_broken_files_are_rejected_with_their_reason(tmp_path):
    source = tmp_path / "source"
    write_brand_tree(source, {"alfa": 5, "brio": 5})
    write_zero_bytes(source / "alfa" / "empty.jpg")
    write_truncated_jpeg(source / "alfa" / "cut.jpg", seed=100)
    write_truncated_jpeg(source / "alfa" / "cut_near_end.JPG", seed=101, keep=0.95)
    write_text(source / "alfa" / "notes.jpg")
    write_jpeg(source / "brio" / "thumb.jpg", seed=102, size=(20, 20))
    write_huge_header_png(source / "brio" / "bomb.png")  # 100 MP header: over max_pixels
    write_huge_header_png(source / "brio" / "big_bomb.png", 20_000, 20_000)  # over Pillow's own hard limit
    write_text(source / "brio" / "readme.txt")
    write_text(source / "brio" / ".DS_Store")
    write_text(source / "stray.jpg")  # not inside a brand folder

    summary = prepare(source, tmp_path / "out")

    got = reasons(summary)
    assert set(got) == {"alfa/empty.jpg", "alfa/cut.jpg", "alfa/cut_near_end.JPG", "alfa/notes.jpg", "brio/thumb.jpg", "brio/bomb.png", "brio/big_bomb.png"}
    assert got["alfa/empty.jpg"].startswith("empty file")
    assert got["alfa/cut.jpg"] == "truncated image"
    assert got["alfa/cut_near_end.JPG"] == "truncated image"
    assert got["alfa/notes.jpg"].startswith("not an image")
    assert got["brio/thumb.jpg"].startswith("too small: 20x20")
    assert got["brio/bomb.png"].startswith("too many pixels: 10000x10000")
    assert got["brio/big_bomb.png"].startswith("too many pixels")
    skipped = {entry["path"]: entry["reason"] for entry in summary.skipped}
    assert set(skipped) == {"brio/readme.txt", "brio/.DS_Store", "stray.jpg"}
    assert skipped["stray.jpg"] == "not inside a brand folder"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {entry["path"] for entry in manifest["rejected"]} == set(got)
    assert len(manifest["skipped"]) == 3
    assert sorted(split_of(tmp_path / "out")) == sorted(f"{b}/{b}_{n:02d}.jpg" for b in ("alfa", "brio") for n in range(5))


def test_unreadable_file_is_rejected(tmp_path, monkeypatch):
    """A file the user may not read. CI runs as root, which reads whatever the mode: the refusal is injected
    (the PermissionError a non-root reader gets for a mode-000 file) instead of made with chmod."""
    locked = write_jpeg(tmp_path / "locked.jpg", seed=1)
    read_bytes = Path.read_bytes

    def refuse_locked(path: Path) -> bytes:
        if path == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", refuse_locked)
    check = check_image(VerifyTask(locked), Limits())
    assert not check.accepted and check.reason == f"unreadable: {os.strerror(errno.EACCES)}", check.reason
    assert check_image(VerifyTask(write_jpeg(tmp_path / "other.jpg", seed=2)), Limits()).accepted


def test_vanished_file_is_rejected_as_unreadable(tmp_path):
    # What root sees instead of a permission error: the file cannot be opened at all.
    check = check_image(VerifyTask(tmp_path / "gone.jpg"), Limits())
    assert not check.accepted and check.reason.startswith("unreadable")


def test_max_pixels_and_min_side_are_options(tmp_path):
    source = tmp_path / "source"
    write_brand_tree(source, {"alfa": 4, "brio": 4})
    write_jpeg(source / "alfa" / "large.jpg", seed=50, size=(300, 300))
    write_jpeg(source / "brio" / "large.jpg", seed=51, size=(300, 300))
    summary = prepare(source, tmp_path / "out", max_pixels=50_000, min_side=90)
    too_many = "too many pixels: 300x300 = 90000 pixels is over the limit of 50000 pixels (prepare --max-pixels)"
    assert reasons(summary) == {"alfa/large.jpg": too_many, "brio/large.jpg": too_many}
    summary = prepare(source, tmp_path / "out", min_side=100)
    assert len(summary.rejected) == 8  # the 120x90 images
    assert all(reason.startswith("too small: 120x90") for reason in reasons(summary).values())


# --- odd but valid images are accepted ------------------------------------------------------------


def test_odd_but_valid_images_are_accepted(tmp_path):
    source = tmp_path / "source"
    write_brand_tree(source, {"alfa": 3, "brio": 3})
    odd = {
        "alfa/png inside.jpg": lambda p: write_png_named_jpg(p, 60),
        "alfa/grey (1).jpg": lambda p: write_jpeg(p, 61, mode="L"),
        "brio/cmyk.jpeg": lambda p: write_jpeg(p, 62, mode="CMYK"),
        "brio/rotated.jpg": lambda p: write_exif_rotated(p, 63),
        "brio/Ærø café ñ 東京.jpg": lambda p: write_jpeg(p, 64),
        "brio/upper.PNG": lambda p: photo(65).save(p, format="PNG"),
        "alfa/bitmap.bmp": lambda p: photo(66).save(p, format="BMP"),
        "alfa/web.webp": lambda p: photo(67).save(p, format="WEBP"),
    }
    for relative, write in odd.items():
        write(source / relative)

    summary = prepare(source, tmp_path / "out")

    assert summary.rejected == []
    assert set(odd) <= set(split_of(tmp_path / "out"))
    dataset = load_prepared(tmp_path / "out")
    assert all(sample.path.is_file() for samples in dataset.splits.values() for sample in samples)


def test_exif_rotated_size_is_recorded_as_shown(tmp_path):
    check = check_image(VerifyTask(write_exif_rotated(tmp_path / "rotated.jpg", seed=3)), Limits())
    assert check.accepted and (check.width, check.height) == (100, 200)


# --- fresh split ----------------------------------------------------------------------------------


def test_fresh_split_is_stratified_deterministic_and_keeps_duplicates_together(tmp_path):
    source = tmp_path / "source"
    write_brand_tree(source, {"alfa": 30, "brio": 30, "cora": 20})
    exact = source / "alfa" / "alfa_00 copy.jpg"
    exact.write_bytes((source / "alfa" / "alfa_00.jpg").read_bytes())
    write_jpeg(source / "brio" / "brio_05 resaved.jpg", seed=35, size=(240, 180))  # same picture as brio_05, other size
    duplicates = [["alfa/alfa_00 copy.jpg", "alfa/alfa_00.jpg"], ["brio/brio_05 resaved.jpg", "brio/brio_05.jpg"]]

    first = prepare(source, tmp_path / "a", seed=7)
    prepare(source, tmp_path / "b", seed=7)
    prepare(source, tmp_path / "c", seed=8)

    assert first.duplicates == duplicates
    assert first.counts == {
        "train": {"alfa": 25, "brio": 25, "cora": 16},
        "val": {"alfa": 3, "brio": 3, "cora": 2},
        "test": {"alfa": 3, "brio": 3, "cora": 2},
    }
    assigned = split_of(tmp_path / "a")
    for group in duplicates:
        assert len({assigned[path] for path in group}) == 1
    assert split_of(tmp_path / "b") == assigned
    assert split_of(tmp_path / "c") != assigned
    assert first.leakage_removed == []
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["val_frac"] == 0.1 and manifest["test_frac"] == 0.1
    assert manifest["counts"] == first.counts and manifest["duplicates"] == duplicates
    assert json.loads((tmp_path / "a" / "classes.json").read_text()) == ["alfa", "brio", "cora"]


def test_tiny_brand_warns_and_follows_the_rule(tmp_path, capsys):
    source = tmp_path / "source"
    write_brand_tree(source, {"alfa": 20, "brio": 20, "solo": 1, "pair": 2})
    summary = prepare(source, tmp_path / "out")
    stderr = capsys.readouterr().err
    assert "warning: brand 'solo' has 1 image(s), too few to stratify" in stderr
    assert "warning: brand 'pair' has 2 image(s)" in stderr
    assert {split: counts["solo"] for split, counts in summary.counts.items()} == {"train": 1, "val": 0, "test": 0}
    assert {split: counts["pair"] for split, counts in summary.counts.items()} == {"train": 1, "val": 0, "test": 1}


def test_no_images_or_one_brand_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    write_text(empty / "alfa" / "notes.txt")
    with pytest.raises(DataError, match="no images under"):
        prepare(empty, tmp_path / "out")
    single = tmp_path / "single"
    write_brand_tree(single, {"alfa": 5})
    with pytest.raises(DataError, match="only one brand"):
        prepare(single, tmp_path / "out")
    broken = tmp_path / "broken"
    write_zero_bytes(broken / "alfa" / "a.jpg")
    write_zero_bytes(broken / "brio" / "b.jpg")
    with pytest.raises(DataError, match="all 2 images .* were rejected"):
        prepare(broken, tmp_path / "out")


def test_bad_options_are_usage_errors(tmp_path):
    source = tmp_path / "source"
    write_brand_tree(source, {"alfa": 3, "brio": 3})
    with pytest.raises(UsageError, match="--val-frac"):
        prepare(source, tmp_path / "out", val_frac=0.6, test_frac=0.5)
    with pytest.raises(UsageError, match="source folder itself"):
        prepare(source, source)
    with pytest.raises(UsageError, match="--crop-boxes"):
        prepare(source, tmp_path / "out", crop_boxes=True)


def test_output_inside_the_source_is_not_scanned(tmp_path):
    source = tmp_path / "source"
    write_brand_tree(source, {"alfa": 4, "brio": 4})
    prepare(source, source / "prepared")
    summary = prepare(source, source / "prepared")
    assert summary.classes == ["alfa", "brio"] and summary.skipped == []


def test_a_failed_run_leaves_no_valid_looking_manifest(tmp_path):
    source = tmp_path / "source"
    write_brand_tree(source, {"alfa": 4, "brio": 4})
    prepare(source, tmp_path / "out")
    assert (tmp_path / "out" / "manifest.json").is_file()
    write_brand_tree(tmp_path / "single", {"alfa": 3})
    with pytest.raises(DataError):
        prepare(tmp_path / "single", tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(DataError, match="not a prepared dataset"):
        load_prepared(tmp_path / "out")


# --- a source that is already split -------------------------------------------------------------


def test_given_split_keeps_test_carves_val_and_removes_leaked_copies(tmp_path):
    source = tmp_path / "source"
    write_brand_tree(source / "train", {"alfa": 20, "brio": 20})
    write_brand_tree(source / "test", {"alfa": 5, "brio": 5}, first_seed=1000)
    leaked = source / "train" / "brio" / "leaked.jpg"
    leaked.write_bytes((source / "test" / "brio" / "brio_02.jpg").read_bytes())

    summary = prepare(source, tmp_path / "out")

    assert summary.counts == {"train": {"alfa": 18, "brio": 18}, "val": {"alfa": 2, "brio": 2}, "test": {"alfa": 5, "brio": 5}}
    assert summary.leakage_removed == [{"path": "train/brio/leaked.jpg", "duplicate_of": ["test/brio/brio_02.jpg"]}]
    assigned = split_of(tmp_path / "out")
    assert "train/brio/leaked.jpg" not in assigned
    assert all(assigned[path] == "test" for path in assigned if path.startswith("test/"))
    assert all(assigned[path] in ("train", "val") for path in assigned if path.startswith("train/"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["test_frac"] is None and manifest["layout"] == "split"

    kept = prepare(source, tmp_path / "kept", keep_leaked=True)
    assert kept.leakage_removed == []
    assert split_of(tmp_path / "kept")["train/brio/leaked.jpg"] in ("train", "val")
    assert json.loads((tmp_path / "kept" / "manifest.json").read_text())["leakage_kept"][0]["path"] == "train/brio/leaked.jpg"


def test_given_val_folder_is_kept(tmp_path):
    source = tmp_path / "source"
    write_brand_tree(source / "train", {"alfa": 6, "brio": 6})
    write_brand_tree(source / "val", {"alfa": 2, "brio": 2}, first_seed=100)
    write_brand_tree(source / "test", {"alfa": 2, "brio": 2}, first_seed=200)
    summary = prepare(source, tmp_path / "out")
    assert {split: sum(counts.values()) for split, counts in summary.counts.items()} == {"train": 12, "val": 4, "test": 4}


# --- the real cars5 photos ------------------------------------------------------------------------

CARS5_LEAKS = [  # confirmed by eye: the same photo in train and test
    ("train/audi/36.jpg", "test/audi/70.jpg"),
    ("train/audi/42.jpg", "test/audi/71.jpg"),
    ("train/bmw/29.jpg", "test/bmw/75.jpg"),
    ("train/mercedes/36.jpg", "test/mercedes/8.jpg"),
]
CARS5_TRAIN_DUPLICATES = [  # twice inside train; 28/58 is a re-encode (not byte-equal)
    ["train/audi/28.jpg", "train/audi/58.jpg"],
    ["train/ferrari/33.jpg", "train/ferrari/51.jpg"],
    ["train/lamborghini/14.jpg", "train/lamborghini/63.jpg"],
    ["train/lamborghini/17.jpg", "train/lamborghini/22.jpg"],
    ["train/lamborghini/19.jpg", "train/lamborghini/53.jpg"],
]


def test_cars5_real_photos(prepared_cars5):
    manifest = json.loads((prepared_cars5 / "manifest.json").read_text())
    brands = ["audi", "bmw", "ferrari", "lamborghini", "mercedes"]
    assert json.loads((prepared_cars5 / "classes.json").read_text()) == brands
    assert manifest["counts"] == {
        "train": {"audi": 52, "bmw": 53, "ferrari": 54, "lamborghini": 54, "mercedes": 53},
        "val": dict.fromkeys(brands, 6),
        "test": dict.fromkeys(brands, 20),
    }
    assert manifest["rejected"] == [] and manifest["skipped"] == []
    assert [(leak["path"], *leak["duplicate_of"]) for leak in manifest["leakage_removed"]] == CARS5_LEAKS
    assert manifest["duplicates"] == sorted([sorted(pair) for pair in CARS5_LEAKS] + CARS5_TRAIN_DUPLICATES)
    assigned = split_of(prepared_cars5)
    assert all(path not in assigned for path, _ in CARS5_LEAKS)
    for group in CARS5_TRAIN_DUPLICATES:
        assert len({assigned[path] for path in group}) == 1
    # The smallest real photo (113 px short side) is kept by the default min_side.
    assert manifest["image_sizes"]["min_short_side"] == 113
    assert manifest["image_sizes"]["smallest"] in assigned
    assert manifest["images_per_second"] > 0


# --- the command line -----------------------------------------------------------------------------


def prepare_only(monkeypatch):
    # The other sub-commands are built by other modules; the dispatch code is the real one.
    monkeypatch.setattr(cli, "COMMANDS", {"prepare": cli.COMMANDS["prepare"]})


def test_cli_missing_source_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    prepare_only(monkeypatch)
    code = cli.main(["prepare", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--quiet"])
    stderr = capsys.readouterr().err
    assert code == 1
    assert stderr == f"carbrand prepare: error: source not found: {tmp_path / 'nowhere'}\n"


def test_cli_prints_the_count_table(tmp_path, monkeypatch, capsys):
    prepare_only(monkeypatch)
    source = tmp_path / "source"
    write_brand_tree(source, {"alfa": 10, "brio": 10})
    code = cli.main(["prepare", str(source), "--out", str(tmp_path / "out"), "--seed", "3", "--workers", "1"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "alfa" in stdout and "images/s" in stdout
    assert [line.split() for line in stdout.splitlines() if line.startswith("total")] == [["total", "16", "2", "2", "20"]]


def test_a_source_of_symbolic_links_prepares_and_loads_while_broken_links_get_a_reason(cars5_dir, tmp_path):
    """Links to photos elsewhere (files and a folder) are images like any other, their targets recorded for the
    loaders' root check; dangling links, loops, a folder link back up the tree, a pipe and a link to a text file
    each get a reason in manifest.json. A link re-aimed after prepare is refused by the loader."""
    import torch

    from carbrand.config import DataConfig
    from carbrand.data.loaders import build_eval_loader, resolve_backend

    elsewhere, source = tmp_path / "photos", tmp_path / "links"
    (source / "audi").mkdir(parents=True)
    (elsewhere / "bmw").mkdir(parents=True)
    for index, photo_path in enumerate(sorted((cars5_dir / "train" / "audi").iterdir())[:6]):
        shutil.copy(photo_path, elsewhere / f"audi_{index}.jpg")
        (source / "audi" / f"{index}.jpg").symlink_to(elsewhere / f"audi_{index}.jpg")
    for photo_path in sorted((cars5_dir / "train" / "bmw").iterdir())[:6]:
        shutil.copy(photo_path, elsewhere / "bmw" / photo_path.name)
    (source / "bmw").symlink_to(elsewhere / "bmw", target_is_directory=True)  # a whole brand folder linked
    (elsewhere / "bmw" / "again").symlink_to(elsewhere / "bmw", target_is_directory=True)  # a loop back up
    (source / "audi" / "gone.jpg").symlink_to(elsewhere / "deleted.jpg")
    (source / "audi" / "loop.jpg").symlink_to("loop.jpg")
    write_text(elsewhere / "notes.txt", "not a photo")
    (source / "audi" / "notes.jpg").symlink_to(elsewhere / "notes.txt")
    os.mkfifo(source / "audi" / "pipe.jpg")  # read_bytes() on it would wait for ever
    (source / "stray.jpg").symlink_to(elsewhere / "nowhere.jpg")

    out = tmp_path / "out"
    summary = prepare(source, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {entry["path"]: entry["reason"] for entry in manifest["skipped"]} == {
        "audi/gone.jpg": f"dangling symbolic link (to {elsewhere / 'deleted.jpg'}, which does not exist)",
        "audi/loop.jpg": "symbolic link loop",
        "audi/pipe.jpg": "not a regular file (a device, pipe or socket)",
        "bmw/again": f"symbolic link loop: leads to a folder already listed ({source / 'bmw'})",
        "stray.jpg": f"dangling symbolic link (to {elsewhere / 'nowhere.jpg'}, which does not exist)",
    }
    assert manifest["rejected"] == [{"path": "audi/notes.jpg", "reason": "not an image (Pillow cannot identify the "
                                     f"content) (a symbolic link to {elsewhere / 'notes.txt'})"}]
    kept = sum(summary.total(name) for name in ("train", "val", "test"))
    assert kept == 12 and len(manifest["linked"]) == 12, manifest["linked"]
    assert manifest["linked"]["audi/0.jpg"] == str(elsewhere / "audi_0.jpg")
    assert manifest["linked"]["bmw/" + sorted(p.name for p in (elsewhere / "bmw").glob("*.jpg"))[0]].startswith(
        str(elsewhere / "bmw"))

    dataset = load_prepared(out)  # the root check lets exactly the recorded targets through
    samples = [sample for name in ("train", "val", "test") for sample in dataset.split(name)]
    data = DataConfig(loader="torchvision", decode="cpu", image_size=32, batch_size=4, workers=0)
    loader = build_eval_loader(data, samples, backend=resolve_backend(data, torch.device("cpu")), rank=0, world_size=1,
                               device=torch.device("cpu"), dtype=torch.float32, channels_last=False)
    assert sum(len(labels) for _, labels, _ in loader) == 12

    (source / "audi" / "0.jpg").unlink()  # re-aimed after prepare, at a file prepare never saw
    shutil.copy(elsewhere / "audi_1.jpg", tmp_path / "planted.jpg")
    (source / "audi" / "0.jpg").symlink_to(tmp_path / "planted.jpg")
    with pytest.raises(DataError, match=rf"'audi/0.jpg' leads to {tmp_path / 'planted.jpg'}, outside the dataset root "
                                        rf".*\(prepare recorded it leading to {elsewhere / 'audi_0.jpg'}\)"):
        load_prepared(out)
