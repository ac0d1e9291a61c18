"""Read the records of a W&B `.wandb` file (wandb 0.31 ships no Python reader any more).

The file is a LevelDB-style log: a 7-byte header (b":W&B", magic 0xBEE1, version 0 in wandb 0.31), then
32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first,
3 middle, 4 last); a block tail shorter than a chunk header is zero padding. Each joined
record is a `wandb_internal_pb2.Record` protobuf.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK_SIZE = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    assert (ident, magic) == (b":W&B", 0xBEE1) and version in (0, 1), f"{path} is not a W&B record log"
    records, pending, offset = [], b"", FILE_HEADER.size
    while offset + CHUNK_HEADER.size <= len(data):
        room = BLOCK_SIZE - offset % BLOCK_SIZE
        if room < CHUNK_HEADER.size:  # zero padding at the end of a block
            offset += room
            continue
        _, length, kind = CHUNK_HEADER.unpack_from(data, offset)
        if length == 0 and kind == 0:
            break  # preallocated tail
        payload = data[offset + CHUNK_HEADER.size: offset + CHUNK_HEADER.size + length]
        offset += CHUNK_HEADER.size + length
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def read_history(path: Path) -> list[dict]:
    """History rows as dicts: {"_step": n, "train/loss": ..., ...}."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = "/".join(item.nested_key) if item.nested_key else item.key
            row[key] = json.loads(item.value_json)
        if record.history.HasField("step") and "_step" not in row:
            row["_step"] = record.history.step.num
        rows.append(row)
    return rows
