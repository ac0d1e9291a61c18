"""The full check of a sharded split's shards before training or evaluation reads them.

Read once from start to end (sequential, as fast as the file system streams): the tar's
sha256 against shards.json, its headers against the index (a member where the index says,
of the size it says), and every image member opened far enough to read its header: of the
kind its extension says (a .jpg is a JPEG) and within the pixel limit. Each rank checks
every world_size-th shard of the split, so together the ranks read each shard once; a bad one
stops the run with one line naming the shard and the member, before the first step.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Sequence
from pathlib import Path

from PIL import UnidentifiedImageError

from carbrand.data.images import open_within_pixel_limit
from carbrand.data.manifest import Sample
from carbrand.data.shard_format import (
    SHARDS_FILE,
    ShardEntry,
    parse_index,
    read_shards_json,
)
from carbrand.errors import DataError, first_line

# The image kind PIL reports for each image member extension (shard_format.IMAGE_MEMBER_EXTENSIONS).
EXTENSION_KIND = {"jpg": "JPEG", "png": "PNG", "bmp": "BMP", "webp": "WEBP"}


def check_split_shards(samples: Sequence[Sample], *, rank: int, world_size: int, max_pixels: int) -> int:
    """Check this rank's part of the shards `samples` come from (none for image files); the number checked."""
    shards = list(dict.fromkeys(s.member.shard for s in samples if s.member is not None))
    mine = shards[rank::world_size]
    if not mine:
        return 0
    entries = _entries(mine[0].parent.parent)
    for shard in mine:
        check_shard(shard, entries[shard], max_pixels)
    return len(mine)


def _entries(directory: Path) -> dict[Path, ShardEntry]:
    return {directory / entry.name: entry for split in read_shards_json(directory).values() for entry in split}


class _HashingReader:
    """A read-only stream that hashes what is read through it (one pass: checksum and members)."""

    def __init__(self, handle):
        self.handle, self.sha256 = handle, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.sha256.update(data)
        return data


def check_shard(shard: Path, entry: ShardEntry, max_pixels: int) -> None:
    lines = parse_index((shard.parent.parent / entry.index).read_text(encoding="utf-8"), entry.index)
    expected = iter([member for line in lines for member in line.members])
    where = shard
    try:
        with shard.open("rb") as handle:
            stream = _HashingReader(handle)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for info in tar:
                    where = f"{shard}:{info.name}"
                    extension, offset, size, name = next(expected, ("", -1, -1, "(none)"))
                    if (info.name, info.offset_data, info.size) != (name, offset, size):
                        raise DataError(f"{where}: the index expects {name} at byte {offset} ({size} bytes) here")
                    data = tar.extractfile(info).read()
                    if extension in EXTENSION_KIND:
                        _check_image(data, extension, where, max_pixels)
            while stream.read(1 << 20):  # the end-of-archive padding is part of the checksum
                pass
    except (tarfile.TarError, EOFError) as error:
        raise DataError(f"{where}: the tar is damaged or truncated ({first_line(error)})") from None
    missing = next(expected, None)
    if missing is not None:
        raise DataError(f"{shard}:{missing[3]}: in the index but not in the shard: truncated")
    if stream.sha256.hexdigest() != entry.sha256:
        raise DataError(f"{shard}: sha256 differs from {SHARDS_FILE}'s: the shard was changed or damaged after writing")


def _check_image(data: bytes, extension: str, where: str, max_pixels: int) -> None:
    try:
        with open_within_pixel_limit(io.BytesIO(data), max_pixels) as image:
            kind = image.format
    except (OSError, UnidentifiedImageError):
        raise DataError(f"{where}: not an image (a .{extension} member must be a {EXTENSION_KIND[extension]} image)") from None
    except DataError as error:
        raise DataError(f"{where}: {str(error).split(': ', 1)[-1]}") from None
    if kind != EXTENSION_KIND[extension]:
        raise DataError(f"{where}: a {kind} image in a .{extension} member (expected {EXTENSION_KIND[extension]})")
