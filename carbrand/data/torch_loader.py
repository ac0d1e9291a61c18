"""The torchvision fallback loader (where DALI is not installed): PIL decode, same recipe.

Workers return uint8 HWC crops; normalisation happens after the copy to the device
(images.Normalizer, with the same numbers as DALI: data.mean, data.std): a quarter of float32's bytes
cross PCIe, and the NHWC batch permuted to NCHW is channels_last for free.

Augmentation randomness is drawn per sample from (seed, rank, epoch, position in the
epoch), not from each worker's global RNG: the crops do not depend on the number of
workers, persistent workers need no re-seeding per epoch, and a run resumed mid-epoch
gets exactly the crops the un-interrupted run would have had.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2 import functional as F

from carbrand.config import DataConfig
from carbrand.data.augment_policies import apply_seeded, torchvision_augment
from carbrand.data.images import Normalizer, hwc_tensor
from carbrand.data.loader_base import EvalLoader, TrainLoader, shard_sizes
from carbrand.data.manifest import Sample
from carbrand.data.preprocessing import TRAIN_ASPECT_RATIO, TRAIN_CROP_ATTEMPTS, eval_crop_boxes
from carbrand.data.shard_reader import ShardFiles, load_sample_rgb
from carbrand.errors import CarbrandError


def random_resized_crop_box(width: int, height: int, scale_min: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a RandomResizedCrop window, drawn from `rng`.

    torchvision's algorithm, with an explicit generator instead of torch's global RNG.
    """
    area = width * height
    log_ratio = (math.log(TRAIN_ASPECT_RATIO[0]), math.log(TRAIN_ASPECT_RATIO[1]))
    for _ in range(TRAIN_CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale_min, 1.0)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    # No window fits: the largest centred one within the aspect-ratio range.
    ratio = width / height
    w, h = width, height
    if ratio < TRAIN_ASPECT_RATIO[0]:
        h = round(w / TRAIN_ASPECT_RATIO[0])
    elif ratio > TRAIN_ASPECT_RATIO[1]:
        w = round(h * TRAIN_ASPECT_RATIO[1])
    return (height - h) // 2, (width - w) // 2, h, w


class TrainDataset(Dataset):
    """Keys are (sample index, entropy): the entropy seeds this sample's crop, flip and augmentation."""

    def __init__(self, samples: Sequence[Sample], data: DataConfig):
        self.samples, self.image_size, self.crop_scale_min = samples, data.image_size, data.crop_scale_min
        self.max_pixels = data.max_pixels
        self.shard_files = ShardFiles()  # a sharded split's open shards, per worker process
        self.augment = torchvision_augment(data.augment, ops=data.randaugment_ops, magnitude=data.randaugment_magnitude)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, tuple[int, ...]]) -> tuple[torch.Tensor, int]:
        index, entropy = key
        sample = self.samples[index]
        image = load_sample_rgb(sample, self.max_pixels, self.shard_files)
        rng = np.random.default_rng(entropy)
        top, left, h, w = random_resized_crop_box(image.width, image.height, self.crop_scale_min, rng)
        image = F.resized_crop(image, top, left, h, w, [self.image_size, self.image_size],
                               interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        if rng.random() < 0.5:
            image = F.horizontal_flip(image)
        if self.augment is not None:
            image = apply_seeded(self.augment, image, rng)
        return hwc_tensor(image), sample.label


def eval_transform(image: Image.Image, image_size: int, crop_fraction: float, crops: int = 1) -> torch.Tensor:
    """The eval crop for evaluation and prediction: uint8 HWC, image_size x image_size; several
    crops along the longer side (data.eval_crops > 1) stacked as uint8 KHWC.

    One antialiased bilinear resize of the exact source box per crop (see
    preprocessing.eval_crop_boxes), the same geometry as the DALI eval pipeline.
    """
    boxes = eval_crop_boxes(image.width, image.height, image_size, crop_fraction, crops)
    tiles = [hwc_tensor(image.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)) for box in boxes]
    return tiles[0] if crops == 1 else torch.stack(tiles)


class EvalDataset(Dataset):
    """Resize the shorter side to image_size / crop_fraction, centre-crop image_size."""

    def __init__(self, samples: Sequence[Sample], image_size: int, crop_fraction: float, max_pixels: int = 0,
                 crops: int = 1):
        self.samples, self.image_size, self.crop_fraction, self.max_pixels = samples, image_size, crop_fraction, max_pixels
        self.crops = crops
        self.shard_files = ShardFiles()  # a sharded split's open shards, per worker process

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        sample = self.samples[index]
        image = load_sample_rgb(sample, self.max_pixels, self.shard_files)
        return eval_transform(image, self.image_size, self.crop_fraction, self.crops), sample.label, index


class TrainSampler(Sampler):
    """Yields (index, entropy) for the loader's remaining shard of its current epoch."""

    def __init__(self, loader: TrainLoader):
        self.loader = loader  # epoch and start batch are read at each iteration

    def __len__(self) -> int:
        return len(self.loader) * self.loader.batch_size

    def __iter__(self) -> Iterator[tuple[int, tuple[int, ...]]]:
        loader = self.loader
        start = loader.start_batch * loader.batch_size
        for position, index in enumerate(loader.epoch_order(loader.epoch)[start:], start=start):
            yield int(index), (loader.seed, loader.rank, loader.epoch, position)


def _loader_args(data: DataConfig, device: torch.device) -> dict:
    return {
        "batch_size": data.batch_size,
        "num_workers": data.workers,
        "pin_memory": device.type == "cuda",
        # Workers live across epochs (the sampler runs in the main process, so a new
        # epoch's order still reaches them); no fork and re-import per epoch.
        "persistent_workers": data.workers > 0,
        "prefetch_factor": data.prefetch if data.workers > 0 else None,
    }


def worker_errors_in_one_line(batches: Iterator) -> Iterator:
    """`batches`, with a CarbrandError raised in a loader worker (an image over the pixel limit) back to its own line.

    DataLoader re-raises a worker's exception with the worker's whole traceback as its message;
    the last line of that traceback is the original message.
    """
    try:
        yield from batches
    except CarbrandError as error:
        last_line = str(error).strip().splitlines()[-1]
        raise type(error)(last_line.removeprefix(f"{type(error).__module__}.{type(error).__qualname__}: ")) from None


class TorchTrainLoader(TrainLoader):
    def __init__(self, data: DataConfig, samples: Sequence[Sample], *, rank: int, world_size: int, seed: int,
                 device: torch.device, dtype: torch.dtype, channels_last: bool):
        super().__init__(len(samples), rank=rank, world_size=world_size, seed=seed, batch_size=data.batch_size,
                         shards=shard_sizes(samples))
        dataset = TrainDataset(samples, data)
        self._loader = DataLoader(dataset, sampler=TrainSampler(self), drop_last=True, **_loader_args(data, device))
        self._normalize = Normalizer(device, dtype, channels_last, mean=data.mean, std=data.std)
        self.pipelines_built = 0  # worker pools started (persistent: one per run; 0 when loading in-process)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._loader.num_workers and self._loader._iterator is None:  # DataLoader starts its workers now
            self.pipelines_built += 1
        for images, labels in worker_errors_in_one_line(self._loader):
            yield self._normalize(images), labels.to(self._normalize.device, non_blocking=True)

    def close(self) -> None:
        self._loader = None  # drops the persistent workers' iterator, which shuts them down


class TorchEvalLoader(EvalLoader):
    def __init__(self, data: DataConfig, samples: Sequence[Sample], *, rank: int, world_size: int,
                 device: torch.device, dtype: torch.dtype, channels_last: bool):
        super().__init__(len(samples), rank=rank, world_size=world_size, batch_size=data.batch_size,
                         sharded=shard_sizes(samples) is not None)
        dataset = EvalDataset(samples, data.eval_size, data.eval_crop_fraction, data.max_pixels, data.eval_crops)
        # A plain list of indices as the sampler: in order, no padding, last batch partial.
        self._loader = DataLoader(dataset, sampler=self.shard.tolist(), drop_last=False, **_loader_args(data, device))
        self._normalize = Normalizer(device, dtype, channels_last, mean=data.mean, std=data.std)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if not self.num_samples:
            return
        for images, labels, indices in worker_errors_in_one_line(self._loader):
            yield self._normalize(images), labels.to(self._normalize.device, non_blocking=True), indices

    def close(self) -> None:
        self._loader = None
