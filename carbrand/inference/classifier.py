"""Put an exported classifier over images: device placement, autocast, channels-last, flip TTA.

Shared by the evaluator (over an `EvalLoader`, results keyed by sample index) and the
predictor (over one batch of preprocessed images). Flip TTA averages the softmax of each
image and of its horizontal mirror: car brands are not left-right asymmetric, so the
mirror is a free second opinion.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

# --precision takes train.precision's names: auto | no | bf16 | fp16
from carbrand.config import PRECISIONS
from carbrand.errors import UsageError
from carbrand.precision import autocast, resolve_precision


def inference_precision(requested: str, trained_precision: str, device: torch.device) -> str:
    """no | bf16 | fp16 to score an export in: `requested`, or for auto the precision the model was trained in
    on a GPU and full fp32 on the CPU (as train.precision auto does there)."""
    if requested not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}; got {requested!r}")
    if requested == "auto":
        requested = trained_precision if device.type == "cuda" else "no"
    # exports hold the precision their run resolved auto to (train.with_resolved_precision); one whose config says
    # auto, written by hand, gets what auto picks on this GPU
    return resolve_precision(requested, device)


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Eval mode on `device`; NHWC weights when the inputs come channels-last."""
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@torch.inference_mode()
def classify(model: nn.Module, images: torch.Tensor, *, precision: str, tta_flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (logits, probabilities) of one batch; with `tta_flip` both are means over image and mirror."""
    device = images.device
    with autocast(device, precision):
        logits = model(images).float()
    probabilities = logits.softmax(dim=1)
    if tta_flip:
        mirrored = images.flip(-1)  # NCHW logical order whatever the memory format: -1 is width
        if images.is_contiguous(memory_format=torch.channels_last):
            mirrored = mirrored.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            mirrored_logits = model(mirrored).float()
        logits = (logits + mirrored_logits) / 2
        probabilities = (probabilities + mirrored_logits.softmax(dim=1)) / 2
    return logits, probabilities


@dataclass
class SamplePredictions:
    """One rank's predictions, row i belonging to sample `indices[i]` (CPU tensors)."""

    indices: torch.Tensor  # int64 [n]: positions in the sample list given to the loader
    logits: torch.Tensor  # float32 [n, num_classes]
    probabilities: torch.Tensor  # float32 [n, num_classes]

    def __len__(self) -> int:
        return len(self.indices)


def predict_batches(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    num_classes: int,
    precision: str,
    tta_flip: bool = False,
) -> SamplePredictions:
    """Run `model` over `(images, labels, sample_indices)` batches (an EvalLoader).

    Results stay on the device until the end: one host copy for the whole shard, not one
    sync per batch.
    """
    indices, logits, probabilities = [], [], []
    for images, _labels, sample_indices in batches:
        batch_logits, batch_probabilities = classify(model, images, precision=precision, tta_flip=tta_flip)
        indices.append(torch.as_tensor(sample_indices, dtype=torch.int64).reshape(-1))
        logits.append(batch_logits)
        probabilities.append(batch_probabilities)
    if not indices:  # more ranks than samples: this rank's shard is empty
        empty = torch.zeros(0, num_classes)
        return SamplePredictions(torch.zeros(0, dtype=torch.int64), empty, empty.clone())
    result = SamplePredictions(
        indices=torch.cat([i.cpu() for i in indices]),
        logits=torch.cat(logits).cpu(),
        probabilities=torch.cat(probabilities).cpu(),
    )
    assert len(result.indices) == len(result.logits), "a batch's sample indices do not match its images"
    return result
