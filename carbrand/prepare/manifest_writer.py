"""Write a prepared dataset: classes.json, [car_models.json,] train/val/test.csv, then manifest.json (see carbrand.data.manifest).

Each file goes through carbrand.filesystem's atomic write, and manifest.json is removed
first and written last, so a crash leaves no directory that load_prepared would accept.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from carbrand.car_models import CAR_MODELS_FILE, CarModel, car_models_json
from carbrand.data.manifest import FORMAT_VERSION, SPLITS, Sample
from carbrand.filesystem import write_text_atomically

CSV_COLUMNS = ("path", "label", "brand")


def write_prepared(
    directory: Path,
    root: Path,
    classes: list[str],
    splits: dict[str, list[Sample]],
    info: dict[str, Any],
    car_models: list[CarModel] | None = None,
) -> None:
    """Write the manifest directory; manifest.json last, so a crash leaves no valid-looking half."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").unlink(missing_ok=True)
    write_text_atomically(directory / "classes.json", json.dumps(classes, indent=2, ensure_ascii=False) + "\n")
    columns = CSV_COLUMNS
    if car_models is None:
        (directory / CAR_MODELS_FILE).unlink(missing_ok=True)  # a previous prepare's into the same folder
    else:
        write_text_atomically(directory / CAR_MODELS_FILE, car_models_json(car_models))
        columns += ("car_model",)
    for name in SPLITS:
        rows = [[s.path.relative_to(root).as_posix(), s.label, s.brand]
                + ([car_models[s.car_model].name] if car_models is not None else []) for s in splits.get(name, [])]
        write_text_atomically(directory / f"{name}.csv", _csv_text(columns, rows))
    full_info = {"format_version": FORMAT_VERSION, "root": str(root), **info}
    write_text_atomically(directory / "manifest.json", json.dumps(full_info, indent=2, ensure_ascii=False) + "\n")


def _csv_text(columns: tuple[str, ...], rows: list[list[Any]]) -> str:
    """The CSV file's text (csv's own quoting and \\r\\n line ends): any character is allowed in a path."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(rows)
    return buffer.getvalue()
