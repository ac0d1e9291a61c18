"""Grad-CAM (Selvaraju et al., 2017): which part of a photo made the model answer a brand.

    from carbrand.inference.gradcam import explain, overlay, png_bytes
    explanation = explain(model, photo, config.data)                              # top-1 brand
    png_bytes(overlay(photo, explanation))                                         # heat map on the photo

The heat map is computed where the model looks: on the eval preprocessing's centre crop
(preprocessing.eval_crop_box, the geometry of evaluate and predict), from the last
convolutional stage, whatever the architecture: the last top-level part of the model whose
output is still a feature map (`layer4` of a ResNet, the final BatchNorm + activation of a timm
EfficientNet), read off the same forward pass. The gradients of the brand's logit, averaged over
the stage's positions, weight its channels; their positive sum is the map, normalised to a
peak of 1 and upsampled to the crop. Drawn on the original photo, it covers the crop box
only; what the crop leaves out is dimmed, since the model never saw it.

Computed in float32 without autocast, one photo at a time, gradients taken with respect to
the activations only (no parameter .grad is touched, so a serving model is not disturbed).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from carbrand.config import DataConfig
from carbrand.data.images import Normalizer
from carbrand.data.preprocessing import eval_crop_box
from carbrand.data.torch_loader import eval_transform

OVERLAY_MAX_SIDE = 1024  # overlays of large photos are drawn at this size (longer side)


@dataclass
class Explanation:
    label: int  # the explained class (the top-1 one unless asked otherwise)
    probability: float  # its softmax probability (uncalibrated)
    heat: np.ndarray  # float32 [image_size, image_size] in [0, 1], in the eval crop's geometry
    box: tuple[float, float, float, float]  # the crop's (left, top, right, bottom) in the photo's pixels
    photo_size: tuple[int, int]  # (width, height) of the photo explained


def spatial_outputs(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list]:
    """Hooks that record the output of every top-level part of `model`; the caller removes them."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [child.register_forward_hook(lambda _module, _inputs, output, name=name: outputs.__setitem__(name, output))
             for name, child in model.named_children()]
    return outputs, hooks


def last_feature_map(outputs: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
    """The last recorded output that is a feature map (N, C, H, W with H, W > 1): the last convolutional stage."""
    maps = [(name, out) for name, out in outputs.items()
            if isinstance(out, torch.Tensor) and out.ndim == 4 and min(out.shape[-2:]) > 1]
    if not maps:
        raise ValueError("Grad-CAM needs a model with a convolutional stage: no part of it outputs a feature map")
    return maps[-1]


def target_layer(model: torch.nn.Module, image_size: int = 64) -> str:
    """The name of the part Grad-CAM reads (`layer4` of a ResNet), found with one small forward pass."""
    parameter = next(model.parameters())
    outputs, hooks = spatial_outputs(model)
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, dtype=parameter.dtype, device=parameter.device))
    finally:
        for hook in hooks:
            hook.remove()
    return last_feature_map(outputs)[0]


def grad_cam(model: torch.nn.Module, images: torch.Tensor, label: int | None = None) -> tuple[torch.Tensor, int, float]:
    """(heat [H, W] in [0, 1] on the input's grid, explained label, its probability) for one normalised image [1, 3, H, W]."""
    outputs, hooks = spatial_outputs(model)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            logits = model(images.float()).float()
            if label is None:
                label = int(logits[0].argmax())
            probability = float(logits[0].detach().softmax(dim=0)[label])
            _, stage = last_feature_map(outputs)
            (gradients,) = torch.autograd.grad(logits[0, label], stage)
    finally:
        for hook in hooks:
            hook.remove()
    activations = stage.detach()
    weights = gradients.mean(dim=(2, 3), keepdim=True)  # one weight per channel: its average gradient
    cam = F.relu((weights * activations).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    peak = cam.max()
    return (cam / peak if peak > 0 else cam).cpu(), label, probability


def explain(model: torch.nn.Module, photo: Image.Image, data: DataConfig, *, label: int | None = None,
            channels_last: bool = False) -> Explanation:
    """Grad-CAM of an upright RGB photo through the eval preprocessing of `data` (the model stays on its device)."""
    device = next(model.parameters()).device
    image_size, crop_fraction = data.eval_size, data.eval_crop_fraction
    crop = eval_transform(photo, image_size, crop_fraction)
    images = Normalizer(device, torch.float32, channels_last, mean=data.mean, std=data.std)(crop.unsqueeze(0))
    was_training = model.training
    model.eval()
    try:
        heat, label, probability = grad_cam(model, images, label)
    finally:
        model.train(was_training)
    return Explanation(label=label, probability=probability, heat=heat.numpy().astype(np.float32),
                       box=eval_crop_box(photo.width, photo.height, image_size, crop_fraction), photo_size=photo.size)


def heat_in_photo(explanation: Explanation, size: tuple[int, int] | None = None) -> np.ndarray:
    """The heat map in photo pixels ([height, width], 0 outside the crop), optionally for the photo scaled to `size`."""
    width, height = size or explanation.photo_size
    scale_x, scale_y = width / explanation.photo_size[0], height / explanation.photo_size[1]
    left, top, right, bottom = explanation.box
    x0, y0 = round(left * scale_x), round(top * scale_y)
    x1, y1 = max(x0 + 1, round(right * scale_x)), max(y0 + 1, round(bottom * scale_y))
    patch = Image.fromarray(explanation.heat, mode="F").resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
    full = np.zeros((height, width), dtype=np.float32)
    visible = full[max(0, y0):min(height, y1), max(0, x0):min(width, x1)]
    patch_array = np.asarray(patch, dtype=np.float32)[max(0, -y0):, max(0, -x0):]
    visible[...] = patch_array[:visible.shape[0], :visible.shape[1]]
    return np.clip(full, 0.0, 1.0)


def overlay(photo: Image.Image, explanation: Explanation, max_side: int = OVERLAY_MAX_SIDE) -> Image.Image:
    """The photo with the heat map (jet colours) over the crop box, the rest dimmed, the box outlined."""
    from matplotlib import colormaps

    scale = min(1.0, max_side / max(photo.size))
    size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
    base = np.asarray(photo.convert("RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255
    heat = heat_in_photo(explanation, size)
    colours = colormaps["jet"](heat)[..., :3]
    alpha = (0.15 + 0.5 * heat)[..., None]
    left, top, right, bottom = (v * scale for v in explanation.box)
    inside = np.zeros(heat.shape, dtype=bool)
    inside[max(0, round(top)):round(bottom), max(0, round(left)):round(right)] = True
    blended = np.where(inside[..., None], base * (1 - alpha) + colours * alpha, base * 0.35)
    image = Image.fromarray((blended * 255).round().clip(0, 255).astype(np.uint8))
    ImageDraw.Draw(image).rectangle([left, top, right - 1, bottom - 1], outline=(255, 255, 255), width=max(1, round(2 * scale + 0.5)))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
