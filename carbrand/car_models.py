"""Car models: labels finer than the brand ("Audi R8 Coupe 2012" inside "Audi"), each inside one brand.

A prepared Stanford Cars set keeps each photo's car model (car_models.json beside classes.json);
a network trained on them (data.labels: car_model) carries the same file into its export, where
model.BrandsFromCarModels sums each brand's car-model probabilities into the brand's answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carbrand.errors import DataError

CAR_MODELS_FILE = "car_models.json"


@dataclass(frozen=True)
class CarModel:
    name: str  # "Audi R8 Coupe 2012"
    brand: str  # the brand it belongs to, one of classes.json


def read_car_models(path: Path, classes: list[str]) -> list[CarModel]:
    """car_models.json of a prepared dataset or an export: each entry names a car model once and a known brand."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is not valid JSON") from None
    return car_models_from_json(entries, classes, str(path))


def car_models_from_json(entries: Any, classes: list[str], where: str) -> list[CarModel]:
    if not isinstance(entries, list) or not entries or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) and e["name"] and isinstance(e.get("brand"), str)
            for e in entries):
        raise DataError(f'{where} must be a non-empty JSON list of {{"name": ..., "brand": ...}} objects')
    car_models = [CarModel(name=e["name"], brand=e["brand"]) for e in entries]
    if len({m.name for m in car_models}) != len(car_models):
        raise DataError(f"{where} lists a car model twice")
    unknown = sorted({m.brand for m in car_models} - set(classes))
    if unknown:
        raise DataError(f"{where}: brand(s) {', '.join(map(repr, unknown[:3]))} are not in classes.json")
    without_models = [brand for brand in classes if brand not in {m.brand for m in car_models}]
    if without_models:  # its summed probability would be 0 for every photo: a brand nobody could be told
        raise DataError(f"{where}: brand(s) {', '.join(map(repr, without_models[:3]))} have no car model")
    return car_models


def car_models_json(car_models: list[CarModel]) -> str:
    return json.dumps([{"name": m.name, "brand": m.brand} for m in car_models], indent=2, ensure_ascii=False) + "\n"


def brand_indices(car_models: list[CarModel], classes: list[str]) -> list[int]:
    """For each car model, the index of its brand in `classes`."""
    return [classes.index(m.brand) for m in car_models]
