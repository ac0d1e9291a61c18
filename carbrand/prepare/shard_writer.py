"""Writing a prepared dataset's splits as WebDataset tar shards (the layout: carbrand.data.shard_format).

Each split's samples are shuffled once (seeded) so that every shard holds a mix of brands,
then written in that order, a new shard whenever the next image would take the current one past
the shard size. Streaming: one image's bytes are in memory at a time, and what grows with the
split is its list of rows (as for any loader), never the images.

Atomic per shard: a shard is written as `.tmp-<name>`, fsynced, its index written and fsynced the
same way, then the index and last the tar renamed into place. A tar under its final name is
therefore complete, and a killed run leaves only `.tmp-*` files, which the next run deletes. A
rerun keeps every complete shard that holds exactly the samples it should (its index says which)
and goes on after the last one. shards.json is written last: without it the folder is no dataset.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from carbrand.data.images import open_within_pixel_limit
from carbrand.data.manifest import Sample
from carbrand.data.shard_format import (
    IndexLine,
    ShardEntry,
    index_text,
    member_key,
    parse_index,
)
from carbrand.errors import DataError, first_line

TAR_FORMAT = tarfile.USTAR_FORMAT  # 512-byte headers, readable by every tar and by DALI
IMAGE_KIND_EXTENSION = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "WEBP": "webp"}  # PIL's format -> member extension


@dataclass
class WriteStats:
    """What one `carbrand shard` run did, for its summary line and the bench."""

    samples_written: int = 0
    samples_kept: int = 0  # in complete shards a previous run left
    bytes_written: int = 0
    seconds: float = 0.0


def shard_order(num_samples: int, seed: int) -> np.ndarray:
    """The order a split's samples are written in: shuffled once, so each shard mixes brands."""
    return np.random.default_rng([seed, 26]).permutation(num_samples)


def shard_name(number: int) -> str:
    return f"shard-{number:06d}"


class _HashingFile:
    """A write-only file that hashes what passes through it (the shard's sha256 without reading it back)."""

    def __init__(self, handle):
        self.handle, self.sha256, self.written = handle, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.written += len(data)
        return self.handle.write(data)

    def tell(self) -> int:
        return self.written


class _ShardBuilder:
    """One shard being written under its temporary name."""

    def __init__(self, folder: Path, number: int):
        self.final = folder / f"{shard_name(number)}.tar"
        self.final_index = folder / f"{shard_name(number)}.idx"
        self.temporary = folder / f".tmp-{self.final.name}"
        self._handle = self.temporary.open("wb")
        self._file = _HashingFile(self._handle)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=TAR_FORMAT)
        self.lines: list[IndexLine] = []

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        entries = []
        for extension, data in members:
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0  # mtime 0: the same input writes the same bytes
            header = len(info.tobuf(TAR_FORMAT, self._tar.encoding, self._tar.errors))
            offset = self._tar.offset + header
            self._tar.addfile(info, io.BytesIO(data))
            entries.append((extension, offset, len(data), info.name))
        self.lines.append(IndexLine(tuple(entries)))

    @property
    def bytes(self) -> int:
        return self._file.written

    def finish(self) -> ShardEntry:
        self._tar.close()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        text = index_text(self.lines).encode("utf-8")
        temporary_index = self.final_index.with_name(f".tmp-{self.final_index.name}")
        with temporary_index.open("wb") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary_index, self.final_index)
        os.replace(self.temporary, self.final)  # the commit point: a tar under its final name is whole
        _fsync_folder(self.final.parent)
        folder = self.final.parent.name
        return ShardEntry(name=f"{folder}/{self.final.name}", index=f"{folder}/{self.final_index.name}", samples=len(self.lines),
                          bytes=self._file.written, sha256=self._file.sha256.hexdigest(),
                          index_sha256=hashlib.sha256(text).hexdigest())

    def abandon(self) -> None:
        self._handle.close()
        self.temporary.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable (a crash after this keeps them)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sample_members(sample: Sample, max_pixels: int, json_text: Callable[[Sample], str]) -> list[tuple[str, bytes]]:
    """The members of one sample: its image bytes unchanged, its label, its JSON.

    The image's header is read again (prepare decoded it fully once): a file replaced since
    prepare by something that is not an image, or is over the pixel limit, stops the run here.
    """
    try:
        data = sample.path.read_bytes()
    except OSError as error:
        raise DataError(f"{sample.path}: cannot read ({first_line(error)}); run `carbrand prepare` again if the images moved") from None
    try:
        with open_within_pixel_limit(io.BytesIO(data), max_pixels) as image:
            kind = image.format
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
        raise DataError(f"{sample.path}: no longer an image prepare accepted; run `carbrand prepare` again") from None
    except DataError as error:
        raise DataError(f"{sample.path}: {str(error).split(': ', 1)[-1]}") from None
    extension = IMAGE_KIND_EXTENSION.get(kind)
    if extension is None:
        raise DataError(f"{sample.path}: a {kind} image; shards hold {', '.join(IMAGE_KIND_EXTENSION)} images")
    return [(extension, data), ("cls", str(sample.label).encode("ascii")), ("json", json_text(sample).encode("utf-8"))]


def complete_shards(folder: Path) -> list[ShardEntry]:
    """The complete shards a previous run left in `folder`, in order, re-hashed; temporary leftovers deleted."""
    for leftover in folder.glob(".tmp-*"):
        leftover.unlink()
    entries = []
    for number in itertools.count():
        tar, index = folder / f"{shard_name(number)}.tar", folder / f"{shard_name(number)}.idx"
        if not (tar.is_file() and index.is_file()):
            break
        text = index.read_bytes()
        lines = parse_index(text.decode("utf-8"), str(index))
        sha256 = hashlib.sha256()
        with tar.open("rb") as handle:
            while block := handle.read(1 << 20):
                sha256.update(block)
        entries.append(ShardEntry(name=f"{folder.name}/{tar.name}", index=f"{folder.name}/{index.name}", samples=len(lines),
                                  bytes=tar.stat().st_size, sha256=sha256.hexdigest(),
                                  index_sha256=hashlib.sha256(text).hexdigest()))
    for stale in sorted(folder.glob("shard-*")):  # after the first gap: a different earlier run's, rewritten below
        if int(stale.stem.removeprefix("shard-")) >= len(entries):
            stale.unlink()
    return entries


def _recorded_sources(tar: Path, lines: list[IndexLine]) -> list[str]:
    """The source path each sample's .json member records, in order (read at the offsets the index gives)."""
    sources = []
    with tar.open("rb") as handle:
        for line in lines:
            found = [m for m in line.members if m[0] == "json"]
            if not found:
                return []
            _, offset, size, _ = found[0]
            handle.seek(offset)
            try:
                sources.append(json.loads(handle.read(size))["path"])
            except (ValueError, KeyError, TypeError):
                return []
    return sources


def write_split(samples: Sequence[Sample], folder: Path, *, shard_bytes: int, max_pixels: int,
                json_text: Callable[[Sample], str], stats: WriteStats) -> list[ShardEntry]:
    """Write `samples` (already in shard order) into `folder`'s shards, keeping a previous run's complete ones."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = complete_shards(folder)
    kept = 0
    for entry in entries:  # a kept shard must hold exactly the photos at its place in the order
        lines = parse_index((folder.parent / entry.index).read_text(encoding="utf-8"), entry.index)
        if _recorded_sources(folder.parent / entry.name, lines) != [str(s.path) for s in samples[kept:kept + len(lines)]]:
            raise DataError(f"{folder.parent / entry.name}: holds other photos than this split's order puts there "
                            f"(another seed or dataset?); delete {folder} or write to another --out")
        kept += len(lines)
    stats.samples_kept += kept
    start = time.perf_counter()
    builder = None
    try:
        for position in range(kept, len(samples)):
            members = sample_members(samples[position], max_pixels, json_text)
            size = sum(len(data) for _, data in members) + 512 * (len(members) + 3)
            if builder is not None and builder.lines and builder.bytes + size > shard_bytes:
                entries.append(builder.finish())
                stats.bytes_written += entries[-1].bytes
                builder = None
            if builder is None:
                builder = _ShardBuilder(folder, len(entries))
            builder.add(member_key(position), members)
            stats.samples_written += 1
        if builder is not None:
            entries.append(builder.finish())
            stats.bytes_written += entries[-1].bytes
            builder = None
    finally:
        if builder is not None:
            builder.abandon()
    stats.seconds += time.perf_counter() - start
    return entries
