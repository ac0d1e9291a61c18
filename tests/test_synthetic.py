"""The demo dataset: deterministic, well-formed, learnable, and clean for `carbrand prepare`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from carbrand.demo.synthetic import BRANDS, make_demo_dataset
from carbrand.prepare.command import prepare_dataset


def file_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_layout_and_determinism(tmp_path):
    make_demo_dataset(tmp_path / "a", images_per_class=6, test_images_per_class=2, seed=3)
    make_demo_dataset(tmp_path / "b", images_per_class=6, test_images_per_class=2, seed=3)
    make_demo_dataset(tmp_path / "c", images_per_class=6, test_images_per_class=2, seed=4)
    first = file_bytes(tmp_path / "a")
    assert len(first) == len(BRANDS) * 8
    assert sorted(p.name for p in (tmp_path / "a" / "train").iterdir()) == [b.name for b in BRANDS]
    assert first == file_bytes(tmp_path / "b")
    assert first.keys() == file_bytes(tmp_path / "c").keys() and first != file_bytes(tmp_path / "c")
    with Image.open(next((tmp_path / "a").rglob("*.jpg"))) as image:
        assert image.format == "JPEG" and image.size == (144, 144) and image.mode == "RGB"


def features(path: Path) -> np.ndarray:
    """A 4x4x4 histogram of the strongly saturated colours at 64 px: what even a trivial model sees."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB").resize((64, 64))).astype(int)
    saturated = pixels[(pixels.max(axis=-1) - pixels.min(axis=-1)) > 140] // 64
    codes = saturated[:, 0] * 16 + saturated[:, 1] * 4 + saturated[:, 2]
    return np.bincount(codes, minlength=64) / max(1, len(codes))


def test_classes_are_learnable_and_prepare_finds_no_defects(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", seed=0)
    brands = [b.name for b in BRANDS]
    centroids = np.stack([np.mean([features(p) for p in (root / "train" / b).glob("*.jpg")], axis=0) for b in brands])
    test = [(features(p), k) for k, b in enumerate(brands) for p in (root / "test" / b).glob("*.jpg")]
    predicted = [int(np.argmin(np.abs(centroids - f).sum(axis=1))) for f, _ in test]
    accuracy = np.mean([p == k for p, (_, k) in zip(predicted, test)])
    assert accuracy >= 0.8, f"nearest-centroid accuracy {accuracy:.2f}: the demo classes are not separable enough"

    summary = prepare_dataset(root, tmp_path / "prepared", quiet=True, workers=2)
    assert summary.classes == brands
    assert summary.rejected == [] and summary.duplicates == [] and summary.leakage_removed == []
    assert {split: sum(c.values()) for split, c in summary.counts.items()} == {"train": 215, "val": 25, "test": 80}
