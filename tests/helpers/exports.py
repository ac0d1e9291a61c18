"""Exports made by the tests themselves (not by the trainer), so evaluation, prediction and export
tests do not pay for a training run:

- `make_export`: random resnet18 weights at 32 px with a wide head, so different photos get different brands;
- `fit_export`: a resnet18 at 32 px whose BatchNorm statistics and logistic-regression head are fitted to
  cars5's training photos in one forward pass, so its predictions are above chance but far from perfect.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from carbrand.checkpoint import plain_state_dict, save_export
from carbrand.config import load_config
from carbrand.model import build_model

CARS5 = ["audi", "bmw", "ferrari", "lamborghini", "mercedes"]


def make_export(directory: Path, *, arch_in_config: str = "resnet18", classes: list[str] = CARS5) -> Path:
    """Random weights (resnet18, 32 px) with a wide head, so different photos get different brands."""
    torch.manual_seed(0)
    model = build_model("resnet18", len(classes))
    torch.nn.init.normal_(model.fc.weight, std=0.2)
    config = load_config(None, [f"model.arch={arch_in_config}", "data.image_size=32", "wandb.mode=disabled"])
    return save_export(directory, plain_state_dict(model), classes, config)


def export_config(arch: str = "resnet18", image_size: int = 32):
    return load_config(None, [f"model.arch={arch}", f"data.image_size={image_size}", "data.batch_size=16",
                              "data.workers=1", "wandb.mode=disabled"])


def fit_export(directory: Path, prepared: Path) -> Path:
    """BatchNorm statistics and a logistic-regression head from one pass over the training split."""
    from carbrand.data.loaders import build_eval_loader, resolve_backend
    from carbrand.data.manifest import load_prepared

    dataset = load_prepared(prepared)
    config = export_config()
    torch.manual_seed(0)
    model = build_model("resnet18", len(dataset.classes))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the pass
    backbone = torch.nn.Sequential(*list(model.children())[:-1], torch.nn.Flatten())
    subset = dataset.split("train")[::3]  # every brand, a third of the photos: enough for above chance
    loader = build_eval_loader(config.data, subset, backend=resolve_backend(config.data, torch.device("cpu")), rank=0, world_size=1, device=torch.device("cpu"),
                               dtype=torch.float32, channels_last=False)
    features, labels = [], []
    with torch.no_grad():
        model.train()
        for images, batch_labels, _ in loader:
            features.append(backbone(images))
            labels.append(batch_labels)
    loader.close()
    features, labels = torch.cat(features), torch.cat(labels)
    mean, std = features.mean(0), features.std(0) + 1e-6
    head = torch.nn.Linear(features.shape[1], len(dataset.classes))
    optimizer = torch.optim.Adam(head.parameters(), lr=0.01, weight_decay=1e-2)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(head((features - mean) / std), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():  # fold the standardisation into the head: W((f - mean) / std) + b
        model.fc.weight.copy_(head.weight / std)
        model.fc.bias.copy_(head.bias - (head.weight * mean / std).sum(dim=1))
    return save_export(directory, plain_state_dict(model.eval()), dataset.classes, config)


def reference_probabilities(export: Path, paths: list[Path], *, mirrored: bool = False, crops: int = 1) -> torch.Tensor:
    """Softmax of an export over photos, computed apart from the product's loaders and inference code.

    The eval crop as documented (the centred square that "resize the shorter side to size / 0.875, crop
    size" shows, resized once with PIL: at 32 px a crop shifted by half a pixel changes the fitted
    export's answers), ImageNet normalisation and a plain forward pass; `mirrored`: of each photo's mirror.
    `crops` > 1: that crop of each of `crops` squares of the full shorter side, the first at one end of the
    longer side, the last at the other, evenly spaced; the mean of their softmaxes.
    """
    from PIL import Image
    from safetensors.torch import load_file

    config = load_config(export / "config.yaml", [])
    classes = json.loads((export / "classes.json").read_text())
    model = build_model(config.model.arch, len(classes))
    model.load_state_dict(load_file(str(export / "model.safetensors")))
    size = config.data.image_size
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    images = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        shorter = min(image.size)
        side = shorter * size / round(size / config.data.eval_crop_fraction)
        for k in range(crops):
            step = k / (crops - 1) if crops > 1 else 0.5  # where the full-side square sits: 0 one end, 1 the other
            square_left, square_top = (image.width - shorter) * step, (image.height - shorter) * step
            left, top = square_left + (shorter - side) / 2, square_top + (shorter - side) / 2
            crop = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
            pixels = torch.frombuffer(bytearray(crop.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
            images.append((pixels.float() / 255 - mean) / std)
    with torch.no_grad():
        batch = torch.stack(images)
        probabilities = model.eval()(batch.flip(-1) if mirrored else batch).softmax(dim=1)
        return probabilities.unflatten(0, (len(paths), crops)).mean(dim=1)
