"""A sharded split read by DALI's `fn.readers.webdataset` in the exact order the loader chose.

The reader takes tar files and index files, and reads each index's samples in the order the
index lists them, seeking to each member's offset (wds2idx writes them in tar order; nothing in
DALI requires that). So an epoch's order, which sharding.py fixes, is handed to DALI as a list of
pieces: each run of consecutive samples from one shard becomes one small index file listing just
their image members, in order. A rank reads its shards one after the other, so an epoch is about
one piece per shard it reads, and DALI opens each tar once per piece.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from carbrand.data.shard_format import IndexLine, Member, index_text


@dataclass(frozen=True)
class ShardPieces:
    """What fn.readers.webdataset is given: `paths[i]` read through `index_paths[i]`."""

    paths: list[str]
    index_paths: list[str]


class PieceWriter:
    """Index files of pieces, in a private temporary folder removed by `close`."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="carbrand-dali-pieces-"))
        self._written = 0

    def write(self, members: Sequence[Member]) -> ShardPieces:
        """Pieces that read `members` in this order (files from the previous call are deleted: its pipeline is gone)."""
        for old in self.folder.iterdir():
            old.unlink()
        paths, index_paths, start = [], [], 0
        for end in range(1, len(members) + 1):
            if end == len(members) or members[end].shard != members[start].shard:
                lines = [IndexLine(((m.name.split(".", 1)[1], m.offset, m.size, m.name),)) for m in members[start:end]]
                index = self.folder / f"{self._written:08d}.idx"
                index.write_text(index_text(lines), encoding="utf-8")
                self._written += 1
                paths.append(str(members[start].shard))
                index_paths.append(str(index))
                start = end
        return ShardPieces(paths, index_paths)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
