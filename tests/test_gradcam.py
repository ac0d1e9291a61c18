"""Grad-CAM: the heat map finds the class evidence where it is, in the photo's own pixels; `carbrand explain` and
`carbrand predict --explain` write overlays, and a bad photo is one line while the others get theirs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from carbrand.config import DataConfig
from carbrand.data.images import Normalizer
from carbrand.data.preprocessing import eval_crop_box
from carbrand.data.torch_loader import eval_transform
from carbrand.inference.gradcam import explain, heat_in_photo, overlay, target_layer
from carbrand.model import build_model
from tests.helpers.exports import make_export
from tests.helpers.image_factory import photo

PHOTO_SIZE = (72, 56)  # wider than high: the eval crop is a centred square, so photo and crop pixels differ
IMAGE_SIZE, CROP_FRACTION, PATCH = 48, 0.875, 12
DATA = DataConfig(image_size=IMAGE_SIZE, eval_crop_fraction=CROP_FRACTION)  # the eval geometry and normalisation


class PatchNet(nn.Module):
    """Three convolutions, global average pooling, a linear head: small enough to fit in seconds."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2),
                                      nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.fc = nn.Linear(8, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.features(images)).mean(dim=(2, 3)))


def with_patch(seed: int, at: tuple[int, int] | None) -> Image.Image:
    """Smooth random background; a red square at `at` (left, top) in photo pixels, the class evidence."""
    image = np.asarray(photo(seed, PHOTO_SIZE)).copy()
    if at is not None:
        x, y = at
        image[y:y + PATCH, x:x + PATCH] = (230, 20, 20)
    return Image.fromarray(image)


def patch_positions(rng: np.random.Generator, count: int) -> list[tuple[int, int]]:
    """Anywhere the eval crop sees the whole patch."""
    left, top, right, bottom = eval_crop_box(*PHOTO_SIZE, IMAGE_SIZE, CROP_FRACTION)
    return [(int(rng.integers(int(left) + 1, int(right) - PATCH)), int(rng.integers(int(top) + 1, int(bottom) - PATCH)))
            for _ in range(count)]


@pytest.fixture(scope="module")
def patch_model() -> nn.Module:
    """Class 0: the photo holds a red patch (anywhere); class 1: it does not. Fitted through the eval preprocessing."""
    rng = np.random.default_rng(0)
    positions = patch_positions(rng, 16)
    photos = [with_patch(100 + i, positions[i // 2] if i % 2 == 0 else None) for i in range(32)]
    labels = torch.tensor([i % 2 for i in range(32)])
    images = Normalizer(torch.device("cpu"), torch.float32, False, mean=DATA.mean, std=DATA.std)(
        torch.stack([eval_transform(p, IMAGE_SIZE, CROP_FRACTION) for p in photos]))
    torch.manual_seed(0)
    model = PatchNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, "the patch model did not fit"
    optimizer.zero_grad(set_to_none=True)
    return model.eval()


@pytest.mark.parametrize("arch, stage", [("resnet18", "layer4"), ("tf_efficientnet_lite0", "bn2")])
def test_grad_cam_reads_the_last_convolutional_stage_of_any_architecture(arch, stage):
    """layer4 of a torchvision ResNet; the final BatchNorm + activation after conv_head of a timm EfficientNet."""
    assert target_layer(build_model(arch, 3).eval()) == stage


def test_heat_map_peak_lies_inside_the_evidence_patch_in_photo_pixels(patch_model):
    assert target_layer(patch_model) == "features"
    rng = np.random.default_rng(1)
    for number, (x, y) in enumerate(patch_positions(rng, 6)):
        image = with_patch(900 + number, (x, y))
        explanation = explain(patch_model, image, DATA, label=0)
        assert explanation.heat.shape == (IMAGE_SIZE, IMAGE_SIZE) and explanation.heat.max() == pytest.approx(1.0)
        heat = heat_in_photo(explanation)
        assert heat.shape == (PHOTO_SIZE[1], PHOTO_SIZE[0])
        peak_y, peak_x = np.unravel_index(heat.argmax(), heat.shape)
        assert x <= peak_x < x + PATCH and y <= peak_y < y + PATCH, f"peak {(peak_x, peak_y)} outside the patch at {(x, y)}"
        picture = overlay(image, explanation)
        assert picture.size == image.size
        assert not any(p.grad is not None for p in patch_model.parameters())  # gradients w.r.t. activations only
    plain = with_patch(950, None)
    assert explain(patch_model, plain, DATA).label == 1


def test_explain_writes_overlays_and_a_bad_photo_is_one_line(tmp_path, cars5_dir, capsys):
    from carbrand.inference import explain as command
    from carbrand.inference import predict

    export = make_export(tmp_path / "run" / "best")
    good = sorted((cars5_dir / "test" / "audi").iterdir())[:2]
    bad = tmp_path / "broken.jpg"
    bad.write_text("not a photo\n")
    out = tmp_path / "overlays"
    code = command.main(["--checkpoint", str(export), str(good[0]), str(bad), str(good[1]), "--brand", "bmw", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.strip().splitlines() == [f"carbrand explain: error: {bad}: not an image (Pillow cannot identify the content)"]
    for path in good:
        assert Image.open(out / f"{path.stem}.gradcam.png").size == Image.open(path).size  # drawn on the original photo
        assert f"{path}: {out / (path.stem + '.gradcam.png')}" in captured.out
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}.gradcam.png" for p in good)

    assert command.main(["--checkpoint", str(export), str(good[0]), "--brand", "tesla", "--out", str(out)]) == 2
    assert "'tesla' is not a brand this model knows" in capsys.readouterr().err

    explained = tmp_path / "predicted"
    assert predict.main(["--checkpoint", str(export), "--json", "--explain", str(explained), str(good[0]), str(bad)]) == 1
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert document["predictions"][0]["overlay"] == str(explained / f"{good[0].stem}.gradcam.png")
    assert Image.open(document["predictions"][0]["overlay"]).size == Image.open(good[0]).size
    assert [e["path"] for e in document["errors"]] == [str(bad)]
