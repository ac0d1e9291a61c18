"""Put an exported classifier over images: device placement, autocast, channels-last, flip TTA, crops.

Shared by the evaluator (over an `EvalLoader`, results keyed by sample index) and the
predictor (over one batch of preprocessed images). Flip TTA averages the softmax of each
image and of its horizontal mirror: car brands are not left-right asymmetric, so the
mirror is a free second opinion. Several eval crops of a photo (data.eval_crops) are averaged
the same way, into one row per photo.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

# --precision takes train.precision's names: auto | no | bf16 | fp16
from carbrand.config import MAX_EVAL_CROPS, PRECISIONS, Config
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


def add_crops_argument(parser) -> None:
    """--crops K: evaluate and predict's override of the export's data.eval_crops."""
    parser.add_argument("--crops", type=int, default=None, metavar="K",
                        help="crops along each photo's longer side, probabilities averaged (default: the export's "
                             "data.eval_crops; 1 = the centre crop, 3 = start, centre and end: wide photos)")


def check_crops(crops: int) -> int:
    if not 1 <= crops <= MAX_EVAL_CROPS:
        raise UsageError(f"--crops must be in 1..{MAX_EVAL_CROPS}; got {crops}")
    return crops


def with_eval_crops(config: Config, crops: int) -> Config:
    """`config` scoring `crops` eval crops per photo (--crops)."""
    return replace(config, data=replace(config.data, eval_crops=check_crops(crops)))


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Eval mode on `device`; NHWC weights when the inputs come channels-last."""
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def crop_batch(images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(NCHW images for the model, crops per photo): an eval batch of several crops per photo (N, K, C, H, W) is
    N * K images, each photo's K crops side by side (a view: the memory layout is kept)."""
    return (images, 1) if images.dim() == 4 else (images.flatten(0, 1), images.shape[1])


def average_crops(logits: torch.Tensor, crops: int) -> torch.Tensor:
    """One photo's logits from its `crops` rows (in order, K per photo): log of the mean of their softmax.

    Its softmax is the crops' mean probability, so temperature scaling, "unknown" and top-k see an
    ordinary classifier; log-sum-exp keeps it finite where a probability underflows.
    """
    if crops == 1:
        return logits
    log_probabilities = logits.float().log_softmax(dim=1).unflatten(0, (-1, crops))
    return log_probabilities.logsumexp(dim=1) - math.log(crops)


@torch.inference_mode()
def classify(model: nn.Module, images: torch.Tensor, *, precision: str, tta_flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (logits, probabilities) of one batch; with `tta_flip` both are means over image and mirror.

    A batch of several crops per photo (N, K, C, H, W) gives one row per photo: the crops' mean probability
    and its log as the logits (average_crops); with `tta_flip` each crop's logits are first its flip mean.
    """
    images, crops = crop_batch(images)
    logits, probabilities = _classify_images(model, images, precision=precision, tta_flip=tta_flip)
    if crops == 1:
        return logits, probabilities
    logits = average_crops(logits, crops)
    return logits, logits.softmax(dim=1)


def _classify_images(model: nn.Module, images: torch.Tensor, *, precision: str, tta_flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
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
