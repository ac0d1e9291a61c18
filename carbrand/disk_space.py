"""Free space before each checkpoint: a warning while there is still time to act, not a failed save hours later.

A checkpoint is written whole before the oldest one is deleted, and best/ may be rewritten
next to it, so a save needs about twice the size of the last checkpoint. When the run
directory's file system has less free than that, rank 0 says so in one line naming both
figures (at every checkpoint while it lasts). If the save then fails all the same, the
atomic write leaves the previous checkpoint complete and loadable (carbrand/filesystem.py).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import torch

SAFETY_FACTOR = 2


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file() and not path.is_symlink())


def payload_bytes(value: Any) -> int:
    """The tensor bytes inside nested dicts and lists: a first checkpoint's size, before any was written."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(payload_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(payload_bytes(item) for item in value)
    return 0


def human(size: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def warn_if_short_of_space(run_dir: Path, last_checkpoint: Path | None, estimate: Any) -> None:
    """One warning line when free space < twice the last checkpoint (or the `estimate` payload's size)."""
    checkpoint_bytes = directory_bytes(last_checkpoint) if last_checkpoint is not None else payload_bytes(estimate)
    needed = SAFETY_FACTOR * checkpoint_bytes
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        print(f"carbrand: warning: {run_dir} has {free} bytes free ({human(free)}), less than the {needed} bytes "
              f"({human(needed)}) a checkpoint needs (twice the last one, {human(checkpoint_bytes)}); free some space "
              f"or this run stops at a failed save (the previous checkpoint stays loadable)", file=sys.stderr, flush=True)
