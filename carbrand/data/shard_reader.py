"""Reading one sample's image: from its file, or from its shard by offset (a sharded dataset).

A process opens each shard once and reads members with pread at the offsets the index gave:
a sample costs one read, no open and no metadata lookup, which is the point of shards on a
network file system. Descriptors are per process: a loader worker that was forked keeps
its parent's (pread moves no shared file position), one that was started afresh opens its own.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from carbrand.data.images import load_rgb
from carbrand.data.manifest import Sample
from carbrand.data.shard_format import Member
from carbrand.errors import DataError, first_line

# More shards than this open in one process: the oldest is closed (a file-descriptor limit is often 1024).
MAX_OPEN_SHARDS = 64


class MemberBytes(io.BytesIO):
    """A member's bytes that name the member in messages: load_rgb's errors say `shard.tar:000000042.jpg`."""

    def __init__(self, data: bytes, member: Member):
        super().__init__(data)
        self.member = member

    def __str__(self) -> str:
        return str(self.member)


class ShardFiles:
    """This process's open shards, each opened once."""

    def __init__(self):
        self._descriptors: dict[Path, int] = {}
        self.opens = 0  # shards opened by this process (what a benchmark counts)

    def read(self, member: Member) -> bytes:
        descriptor = self._descriptors.get(member.shard)
        if descriptor is None:
            descriptor = self._open(member.shard)
        data = os.pread(descriptor, member.size, member.offset)
        if len(data) != member.size:
            raise DataError(f"{member}: the shard ends {member.size - len(data)} bytes into this member: truncated")
        return data

    def _open(self, shard: Path) -> int:
        if len(self._descriptors) >= MAX_OPEN_SHARDS:
            os.close(self._descriptors.pop(next(iter(self._descriptors))))
        try:
            descriptor = os.open(shard, os.O_RDONLY)
        except OSError as error:
            raise DataError(f"{shard}: cannot open the shard ({first_line(error)})") from None
        self._descriptors[shard] = descriptor
        self.opens += 1
        return descriptor

    def __getstate__(self) -> dict:
        return {"_descriptors": {}, "opens": 0}  # descriptors do not travel to a spawned process

    def close(self) -> None:
        for descriptor in self._descriptors.values():
            os.close(descriptor)
        self._descriptors.clear()


def load_sample_rgb(sample: Sample, max_pixels: int, shards: ShardFiles) -> Image.Image:
    """The sample's image, decoded upright RGB; a member that does not decode is a DataError naming shard and member."""
    if sample.member is None:
        return load_rgb(sample.path, max_pixels)
    data = MemberBytes(shards.read(sample.member), sample.member)
    try:
        return load_rgb(data, max_pixels)
    except (OSError, SyntaxError, ValueError) as error:  # what PIL raises for a damaged or foreign member
        raise DataError(f"{sample.member}: cannot decode the image ({first_line(error)})") from None
