"""Remember each image's verification so a rerun of prepare reads only new or changed files.

    OUT/verify_cache.jsonl     one JSON line per verified image, appended as results arrive

An entry is used only while the file's path, size and mtime (ns), the limits, and the crop box
and crop file are what they were: anything else reads the file again. Lines are appended and
flushed one at a time, so an interrupted prepare (killed, out of power) keeps what it finished;
a line cut short by the crash does not parse and is ignored, never trusted. A prepare that
completes rewrites the file atomically with only the current images' entries.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from carbrand.filesystem import write_text_atomically

CACHE_FILE = "verify_cache.jsonl"
CACHE_VERSION = 2  # 2: the pixel-limit reason in the loaders' words (an entry of 1 would keep the old wording)
FIELDS = ("path", "accepted", "reason", "width", "height", "sha1", "phash")


@dataclass(frozen=True)
class CacheKey:
    path: str
    size: int
    mtime_ns: int
    min_side: int
    max_pixels: int
    crop_box: list[int] | None
    crop_path: str | None
    crop_size: int | None  # bytes of the crop file written, so a replaced or deleted crop reads again


class VerifyCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = _read_entries(path)
        self.kept: list[str] = []  # lines of this run's images, for the final rewrite
        self._handle: IO[str] | None = None

    def lookup(self, key: CacheKey | None) -> dict[str, Any] | None:
        """The recorded check for this key, or None when the file (or its crop) must be read again."""
        if key is None:
            return None
        entry = self.entries.get(key.path)
        if entry is None or entry.get("key") != asdict(key):
            return None
        self.kept.append(json.dumps(entry, ensure_ascii=False))
        return entry["check"]

    def record(self, key: CacheKey | None, check: dict[str, Any]) -> None:
        if key is None:
            return
        line = json.dumps({"version": CACHE_VERSION, "key": asdict(key), "check": check}, ensure_ascii=False)
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("a", encoding="utf-8")
            self._handle.write("\n")  # a line cut short by an earlier crash stays a line of its own
        self._handle.write(line + "\n")
        self._handle.flush()  # in the file before the next image: a kill loses at most the line being written
        self.kept.append(line)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def compact(self) -> None:
        """After a complete run: only this run's images, written atomically."""
        self.close()
        write_text_atomically(self.path, "".join(line + "\n" for line in self.kept))


def cache_key(path: Path, min_side: int, max_pixels: int, crop_box, crop_path: Path | None) -> CacheKey | None:
    """The key of a file as it is now; None when it cannot be read (then it is verified, and that says why)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return CacheKey(path=str(path), size=stat.st_size, mtime_ns=stat.st_mtime_ns, min_side=min_side, max_pixels=max_pixels,
                    crop_box=list(crop_box) if crop_box is not None else None,
                    crop_path=str(crop_path) if crop_path is not None else None, crop_size=crop_file_size(crop_path))


def crop_file_size(crop_path: Path | None) -> int | None:
    """None without a crop; -1 when the crop file is missing."""
    if crop_path is None:
        return None
    try:
        return os.stat(crop_path).st_size
    except OSError:
        return -1


def _read_entries(path: Path) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return entries
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # empty, or cut short by a crash
            continue
        if _well_formed(entry):
            entries[entry["key"]["path"]] = entry  # the last line for a path wins
    return entries


def _well_formed(entry: Any) -> bool:
    return (isinstance(entry, dict) and entry.get("version") == CACHE_VERSION
            and isinstance(entry.get("key"), dict) and isinstance(entry["key"].get("path"), str)
            and isinstance(entry.get("check"), dict) and all(name in entry["check"] for name in FIELDS))
