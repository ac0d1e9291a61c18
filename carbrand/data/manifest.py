"""Reading the prepared dataset on disk (carbrand.prepare.manifest_writer writes it; loaders read it).

    classes.json                 ordered brand names; index = label
    train.csv val.csv test.csv   path,label,brand[,car_model] (path relative to manifest.json's root)
    car_models.json              optional (Stanford Cars): ordered [{"name", "brand"}], the finer classes that the
                                 car_model column names ("Audi R8 Coupe 2012"), each inside one brand
    manifest.json                source, root, seed, fractions, counts, rejections, duplicates

Reading validates everything a loader would otherwise trip over hours later: the
format version, labels that match classes.json, and paths that stay inside the root,
where they really lead (symlinks followed), not only as written.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carbrand.car_models import CAR_MODELS_FILE, CarModel, read_car_models
from carbrand.data.preprocessing import MAX_PIXELS
from carbrand.data.shard_format import Member, is_sharded, read_members, sharded_directory
from carbrand.errors import DataError

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    path: Path  # absolute path of the image file
    label: int  # index into classes
    brand: str  # classes[label], kept for readable CSVs and error messages
    car_model: int | None = None  # index into car_models.json, where the dataset has one
    member: Member | None = None  # where the image lies inside a shard (a sharded dataset); `path` is then its source


@dataclass
class PreparedDataset:
    directory: Path  # where manifest.json lives
    root: Path  # image paths in the CSVs are relative to this
    classes: list[str]
    splits: dict[str, list[Sample]]
    info: dict[str, Any] = field(default_factory=dict)  # the whole manifest.json
    car_models: list[CarModel] | None = None  # the finer labels, where prepare kept them (Stanford Cars)

    def split(self, name: str) -> list[Sample]:
        if name not in self.splits:
            raise DataError(f"{self.directory}: no split '{name}' (have: {', '.join(self.splits)})")
        return self.splits[name]


def safe_relative_path(root: Path, relative: str, where: str) -> Path:
    """Resolve `relative` under `root`, refusing absolute paths and `..` escapes (as written; RootGuard follows symlinks)."""
    if not relative:
        raise DataError(f"{where}: empty image path")
    if os.path.isabs(relative) or Path(relative).is_absolute():
        raise DataError(f"{where}: absolute image path {relative!r} is not allowed (paths are relative to the dataset root)")
    if ".." in Path(relative).parts:
        raise DataError(f"{where}: image path {relative!r} escapes the dataset root")
    return root / relative


class RootGuard:
    """Refuses image paths that really lead outside the dataset root: a symlinked file or folder pointing elsewhere,
    unless it leads exactly where it led when prepare verified it (manifest.json's `linked`).

    A symlink that stays inside the root is fine. One listing per folder tells which entries are
    symlinks, and only those are resolved one by one: a split of a million images costs a listing
    per brand folder, not a system call per image.

    Why a recorded link may pass: the guard keeps a dataset from reading files prepare never
    vetted, e.g. a link planted or re-aimed in a shared image folder after prepare. A link that
    prepare followed was in the source its user chose, its target was decoded as a photo, and
    only that one target file (not its folder, not wherever the link leads later) is let through.
    That opens nothing new to someone who can edit manifest.json: they can already set its
    `root` to any absolute folder.
    """

    def __init__(self, root: Path, linked: dict[str, str] | None = None):
        self.root = root
        self.real_root = Path(os.path.realpath(root))
        self.linked = linked or {}  # CSV path -> the target prepare verified outside the root
        self._folders: dict[Path, tuple[Path, frozenset[str]]] = {}  # folder -> (where it really is, its symlinks)

    def check(self, path: Path, relative: str, where: str) -> None:
        real_folder, symlinks = self._folders.get(path.parent) or self._scan(path.parent)
        real = Path(os.path.realpath(path)) if path.name in symlinks else real_folder / path.name
        if not real.is_relative_to(self.real_root) and self.linked.get(relative) != str(real):
            recorded = self.linked.get(relative)
            was = f" (prepare recorded it leading to {recorded})" if recorded else ""
            raise DataError(f"{where}: image path {relative!r} leads to {real}, outside the dataset root "
                            f"{self.real_root}{was}")

    def _scan(self, folder: Path) -> tuple[Path, frozenset[str]]:
        try:
            with os.scandir(folder) as entries:
                symlinks = frozenset(entry.name for entry in entries if entry.is_symlink())
        except OSError:  # a missing folder: its images fail where they are read, as a missing file does
            symlinks = frozenset()
        self._folders[folder] = scanned = (Path(os.path.realpath(folder)), symlinks)
        return scanned


def dataset_root(directory: Path, info: dict[str, Any]) -> Path:
    """manifest.json's root: absolute (what prepare writes) or relative to the manifest's folder and inside it."""
    manifest_path, value = directory / "manifest.json", info.get("root", "")
    if not isinstance(value, str):
        raise DataError(f"{manifest_path}: 'root' must be a folder path; got {value!r}")
    root = Path(value)
    if not root.is_absolute():
        root = (directory / root).resolve()
        if not root.is_relative_to(directory.resolve()):
            raise DataError(f"{manifest_path}: relative root {value!r} leads to {root}, outside the dataset folder {directory}")
    if not root.is_dir():
        raise DataError(f"{manifest_path}: root {root} is not a folder (were the images moved? run `carbrand prepare` again)")
    return root


def load_prepared(directory: str | Path) -> PreparedDataset:
    """A prepared dataset (the folder prepare wrote), or a sharded one (the folder `carbrand shard` wrote, or its shards.json)."""
    directory = sharded_directory(directory)
    info = read_manifest(directory)
    classes = _read_classes(directory / "classes.json")
    car_models = read_car_models(directory / CAR_MODELS_FILE, classes) if (directory / CAR_MODELS_FILE).is_file() else None
    if is_sharded(directory):
        # The images are in the shards: the source root need not exist here (a cluster gets only the shards),
        # and its paths only name each sample's origin in reports.
        root = Path(info.get("root", "."))
        members = read_members(directory)
        splits = {name: _with_members(_read_split(directory / f"{name}.csv", root, None, classes, car_models), split_members,
                                      directory / f"{name}.csv")
                  for name, split_members in members.items()}
    else:
        root = dataset_root(directory, info)
        guard = RootGuard(root, _linked(directory / "manifest.json", info))
        splits = {name: _read_split(directory / f"{name}.csv", root, guard, classes, car_models)
                  for name in SPLITS if (directory / f"{name}.csv").is_file()}
    if not splits.get("train") and not splits.get("test"):
        raise DataError(f"{directory}: no samples in any split")
    return PreparedDataset(directory=directory, root=root, classes=classes, splits=splits, info=info, car_models=car_models)


def _with_members(samples: list[Sample], members: list[Member], csv_path: Path) -> list[Sample]:
    """A sharded split's samples, each with where its image lies (row i of the CSV is sample i of the shards)."""
    if len(samples) != len(members):
        raise DataError(f"{csv_path} lists {len(samples)} samples, its shards hold {len(members)}: run `carbrand shard` again")
    return [dataclasses.replace(sample, member=member) for sample, member in zip(samples, members)]


def recorded_max_pixels(directory: Path, info: dict[str, Any]) -> int:
    """The pixel limit prepare applied (--max-pixels), from manifest.json: every reader of the dataset applies it too."""
    manifest_path = directory / "manifest.json"
    value = info.get("max_pixels", MAX_PIXELS)  # absent: a manifest from before it was recorded, made with the default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DataError(f"{manifest_path}: 'max_pixels' must be a positive number of pixels; got {value!r}")
    return value


def read_manifest(directory: Path) -> dict[str, Any]:
    """manifest.json as a dict, its format version checked."""
    directory = sharded_directory(directory)
    manifest_path = directory / "manifest.json"
    if not directory.is_dir():
        raise DataError(f"prepared dataset not found: {directory} (run `carbrand prepare SOURCE --out {directory}`)")
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path} is missing: {directory} is not a prepared dataset (run `carbrand prepare`)")
    try:
        info = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{manifest_path} is not valid JSON") from None
    if not isinstance(info, dict):
        raise DataError(f"{manifest_path} must hold a JSON object")
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(
            f"{manifest_path} has format_version {version!r}; this carbrand reads {FORMAT_VERSION}: "
            f"run `carbrand prepare` again on the source"
        )
    return info


def _read_classes(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path} is missing")
    try:
        classes = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is not valid JSON") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise DataError(f"{path} must be a non-empty JSON list of brand names")
    if len(set(classes)) != len(classes):
        raise DataError(f"{path} lists a brand twice")
    return classes


def _linked(manifest_path: Path, info: dict[str, Any]) -> dict[str, str]:
    """manifest.json's `linked` (absent before symlinked sources were recorded: then none may leave the root)."""
    linked = info.get("linked", {})
    if not isinstance(linked, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in linked.items()):
        raise DataError(f"{manifest_path}: 'linked' must map image paths to the files they link to; got {linked!r:.80}")
    return linked


def _read_split(path: Path, root: Path, guard: RootGuard | None, classes: list[str], car_models: list[CarModel] | None) -> list[Sample]:
    samples = []
    car_model_index = {m.name: i for i, m in enumerate(car_models or [])}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"path", "label", "brand"} <= set(reader.fieldnames):
            raise DataError(f"{path} must have the columns path,label,brand")
        for line_number, row in enumerate(reader, start=2):
            where = f"{path}:{line_number}"
            try:
                label = int(row["label"])
            except (TypeError, ValueError):
                raise DataError(f"{where}: label {row['label']!r} is not an integer") from None
            if not 0 <= label < len(classes):
                raise DataError(f"{where}: label {label} is outside 0..{len(classes) - 1}")
            if row["brand"] != classes[label]:
                raise DataError(f"{where}: brand {row['brand']!r} does not match classes.json[{label}] = {classes[label]!r}")
            image = safe_relative_path(root, row["path"], where)
            if guard is not None:  # a sharded dataset's images are in its shards, not under the root
                guard.check(image, row["path"], where)
            samples.append(Sample(path=image, label=label, brand=row["brand"],
                                  car_model=_car_model(row, car_models, car_model_index, where)))
    return samples


def _car_model(row: dict[str, str], car_models: list[CarModel] | None, index: dict[str, int], where: str) -> int | None:
    if car_models is None:
        return None
    name = row.get("car_model")
    if name is None:
        raise DataError(f"{where}: no car_model column, though {CAR_MODELS_FILE} lists car models")
    if name not in index:
        raise DataError(f"{where}: car model {name!r} is not in {CAR_MODELS_FILE}")
    if car_models[index[name]].brand != row["brand"]:
        raise DataError(f"{where}: car model {name!r} belongs to {car_models[index[name]].brand!r}, not {row['brand']!r}")
    return index[name]
