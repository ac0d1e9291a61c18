"""Write a prepared dataset: classes.json, train/val/test.csv, then manifest.json (see carbrand.data.manifest).

Every file is written to a temporary name and renamed, and manifest.json goes last and is
removed first, so a crash leaves no directory that load_prepared would accept half-written.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from carbrand.data.manifest import FORMAT_VERSION, SPLITS, Sample


def write_prepared(
    directory: Path,
    root: Path,
    classes: list[str],
    splits: dict[str, list[Sample]],
    info: dict[str, Any],
) -> None:
    """Write the manifest directory; manifest.json last, so a crash leaves no valid-looking half."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").unlink(missing_ok=True)
    _write_atomic(directory / "classes.json", json.dumps(classes, indent=2, ensure_ascii=False) + "\n")
    for name in SPLITS:
        rows = [[s.path.relative_to(root).as_posix(), s.label, s.brand] for s in splits.get(name, [])]
        _write_csv_atomic(directory / f"{name}.csv", rows)
    full_info = {"format_version": FORMAT_VERSION, "root": str(root), **info}
    _write_atomic(directory / "manifest.json", json.dumps(full_info, indent=2, ensure_ascii=False) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _write_csv_atomic(path: Path, rows: list[list[Any]]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "brand"])
        writer.writerows(rows)
    os.replace(temporary, path)
