"""The sharded dataset's files: shards.json, the WebDataset tar shards and their DALI index files.

    OUT/shards.json            format version, source, shard size, and per split the shards in order:
                               {"name": "train/shard-000000.tar", "index": "train/shard-000000.idx",
                                "samples": n, "bytes": b, "sha256": ..., "index_sha256": ...}
    OUT/train/shard-000000.tar members <key>.jpg (the image's own bytes; .png etc. keep their kind),
                               <key>.cls (the label as ASCII digits), <key>.json (brand, label, source path)
    OUT/train/shard-000000.idx DALI's wds2idx text: "v1.2 <samples>", then one line per sample listing
                               each member as "<ext> <data offset> <size> <member name>"
    OUT/classes.json manifest.json train.csv ...   the prepared dataset's, rows in shard order

A split's sample i is the i-th sample of its shards taken in order, and row i of its CSV; its key
is its position, zero-padded (`member_key`). carbrand.prepare.shard_writer writes these files;
carbrand.data.shard_dataset reads and checks them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carbrand.errors import DataError

SHARDS_FILE = "shards.json"
SHARDS_FORMAT_VERSION = 1
INDEX_VERSION = "v1.2"  # the version DALI's own wds2idx writes
# Image members keep their kind in their extension; DALI's reader takes any of these (";" = one of).
IMAGE_MEMBER_EXTENSIONS = ("jpg", "png", "bmp", "webp")
DALI_IMAGE_EXT = ";".join(IMAGE_MEMBER_EXTENSIONS)


@dataclass(frozen=True)
class Member:
    """Where one sample's image lies: inside which shard, at which byte, how long."""

    shard: Path  # the tar file
    name: str  # the member's name in the tar, e.g. 000000042.jpg
    offset: int  # first byte of the member's data (after its tar header)
    size: int  # bytes

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"


@dataclass(frozen=True)
class ShardEntry:
    """One shard as shards.json lists it."""

    name: str  # tar path relative to the sharded dataset folder
    index: str  # idx path relative to the same folder
    samples: int
    bytes: int
    sha256: str
    index_sha256: str


@dataclass(frozen=True)
class IndexLine:
    """One sample of an index file: its members as (extension, offset, size, name)."""

    members: tuple[tuple[str, int, int, str], ...]

    def image(self) -> tuple[str, int, int, str] | None:
        return next((m for m in self.members if m[0] in IMAGE_MEMBER_EXTENSIONS), None)


def member_key(position: int) -> str:
    """The key of a split's sample at `position` (no dots: WebDataset splits a name at its first dot)."""
    return f"{position:09d}"


def image_extension(suffix: str) -> str:
    """The member extension of an image file's suffix: .jpeg and .JPG are jpg."""
    extension = suffix.lower().lstrip(".")
    return "jpg" if extension == "jpeg" else extension


def is_sharded(path: str | Path) -> bool:
    """Whether `path` names a sharded dataset: a shards.json file or a folder holding one."""
    path = Path(path)
    return (path.name == SHARDS_FILE and path.is_file()) or (path / SHARDS_FILE).is_file()


def sharded_directory(path: str | Path) -> Path:
    """The folder of a sharded dataset named by its folder or its shards.json."""
    path = Path(path)
    return path.parent if path.name == SHARDS_FILE and path.is_file() else path


def index_text(lines: list[IndexLine]) -> str:
    body = "".join(" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in line.members) + "\n"
                   for line in lines)
    return f"{INDEX_VERSION} {len(lines)}\n{body}"


def parse_index(text: str, where: str) -> list[IndexLine]:
    """An index file's samples; any departure from wds2idx's format is a DataError naming `where`."""
    rows = text.splitlines()
    header = rows[0].split() if rows else []
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
        raise DataError(f"{where}: not a WebDataset index (first line must be '{INDEX_VERSION} <samples>')")
    if int(header[1]) != len(rows) - 1:
        raise DataError(f"{where}: the header says {header[1]} samples, the file lists {len(rows) - 1}")
    lines = []
    for number, row in enumerate(rows[1:], start=2):
        fields = row.split(" ")
        if not fields or len(fields) % 4:
            raise DataError(f"{where}:{number}: expected '<ext> <offset> <size> <name>' per member")
        try:
            members = tuple((fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3]) for i in range(0, len(fields), 4))
        except ValueError:
            raise DataError(f"{where}:{number}: offsets and sizes must be integers") from None
        lines.append(IndexLine(members))
    return lines


def shards_json(info: dict[str, Any], splits: dict[str, list[ShardEntry]]) -> str:
    body = {"format_version": SHARDS_FORMAT_VERSION, **info,
            "splits": {name: [entry.__dict__ for entry in entries] for name, entries in splits.items()}}
    return json.dumps(body, indent=2, ensure_ascii=False) + "\n"


def read_shards_json(directory: Path) -> dict[str, list[ShardEntry]]:
    """shards.json's shards per split, each field checked."""
    path = directory / SHARDS_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} is missing: {directory} is not a sharded dataset (run `carbrand shard`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is not valid JSON") from None
    if not isinstance(info, dict) or info.get("format_version") != SHARDS_FORMAT_VERSION:
        raise DataError(f"{path}: format_version must be {SHARDS_FORMAT_VERSION} (run `carbrand shard` again)")
    splits = info.get("splits")
    if not isinstance(splits, dict):
        raise DataError(f"{path}: 'splits' must map split names to lists of shards")
    fields = ShardEntry.__dataclass_fields__
    result = {}
    for name, entries in splits.items():
        if not isinstance(entries, list):
            raise DataError(f"{path}: splits.{name} must be a list of shards")
        result[name] = []
        for number, entry in enumerate(entries):
            if not isinstance(entry, dict) or set(entry) != set(fields):
                raise DataError(f"{path}: splits.{name}[{number}] must have exactly the keys {', '.join(fields)}")
            try:
                result[name].append(ShardEntry(name=str(entry["name"]), index=str(entry["index"]), samples=int(entry["samples"]),
                                               bytes=int(entry["bytes"]), sha256=str(entry["sha256"]),
                                               index_sha256=str(entry["index_sha256"])))
            except (TypeError, ValueError):
                raise DataError(f"{path}: splits.{name}[{number}]: samples and bytes must be integers") from None
    return result


def read_members(directory: Path) -> dict[str, list[Member]]:
    """Each split's image members in sample order, from shards.json and the index files.

    Cheap checks of every shard, on every rank, before anything trains: the tar is there with the
    size shards.json recorded (a truncated copy is not), its index is there with the recorded
    checksum and lists the recorded number of samples, keys in order, each with an image. The
    tar's own checksum and members are checked by carbrand.data.shard_check, each rank its part.
    """
    members: dict[str, list[Member]] = {}
    for split, entries in read_shards_json(directory).items():
        members[split] = []
        for entry in entries:
            tar, index = directory / entry.name, directory / entry.index
            if not tar.is_file():
                raise DataError(f"{tar}: shard missing (shards.json lists it)")
            if tar.stat().st_size != entry.bytes:
                raise DataError(f"{tar}: {tar.stat().st_size} bytes, shards.json recorded {entry.bytes}: truncated or replaced")
            try:
                text = index.read_bytes()
            except FileNotFoundError:
                raise DataError(f"{index}: index missing for shard {tar.name} (DALI reads shards through it; run `carbrand shard` again)") from None
            if hashlib.sha256(text).hexdigest() != entry.index_sha256:
                raise DataError(f"{index}: checksum differs from shards.json's: the index was changed or damaged")
            lines = parse_index(text.decode("utf-8", errors="replace"), str(index))
            if len(lines) != entry.samples:
                raise DataError(f"{index}: lists {len(lines)} samples, shards.json recorded {entry.samples}")
            for line in lines:
                image = line.image()
                key = member_key(len(members[split]))
                if image is None or image[3] != f"{key}.{image[0]}":
                    raise DataError(f"{tar}: sample {key} has no image member in the index (found {' '.join(m[3] for m in line.members)})")
                members[split].append(Member(shard=tar, name=image[3], offset=image[1], size=image[2]))
    return members
