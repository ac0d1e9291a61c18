"""DALI input pipelines: train (ROI random-resized-crop decode) and eval (resize + centre crop).

`decode="gpu"` runs the "mixed" decoder (nvJPEG and, on A100/H100, the hardware JPEG
decoder) and every later op on the GPU; `decode="cpu"` runs the same graph on the CPU
with `device_id=None`, so it works on machines without a GPU and in tests.

Files and labels reach the reader as Python lists, never as a `file_list` text file:
names may hold spaces, commas, parentheses or any Unicode character. A sharded split is read
by `fn.readers.webdataset` through index files of the exact order (dali_shards.py); its labels
and sample indices then come from that order on the Python side, batch by batch.

This module imports DALI at the top; `carbrand.data.loaders` imports it only when the
DALI backend is chosen, so the package works without DALI installed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import nvidia.dali.math as dali_math
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from carbrand.config import DataConfig
from carbrand.data.dali_augment import apply_augment_policy
from carbrand.data.images import check_pixel_limits
from carbrand.data.dali_shards import PieceWriter, ShardPieces
from carbrand.data.loader_base import EvalLoader, TrainLoader, shard_sizes
from carbrand.data.manifest import Sample
from carbrand.data.preprocessing import (
    TRAIN_ASPECT_RATIO,
    TRAIN_CROP_ATTEMPTS,
    eval_crop_positions,
    eval_crop_side_fraction,
    on_255_scale,
)
from carbrand.data.shard_format import DALI_IMAGE_EXT
from carbrand.data.sharding import augmentation_seed

READER = "Reader"  # the iterator finds the shard size through the reader's name

# nvJPEG / HW-decoder preallocation for the "mixed" decoder, the values NVIDIA's ResNet-50
# reference uses (sized for the largest ImageNet photo): buffers are allocated once
# instead of growing (and synchronising the device) whenever a larger photo arrives.
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512
PREALLOCATE_WIDTH_HINT = 5980
PREALLOCATE_HEIGHT_HINT = 6430


def _decoder_args(gpu: bool, hw_decoder_load: float) -> dict:
    """Decoder keyword arguments; the memory/HW-decoder ones exist only for the mixed backend."""
    # adjust_orientation=True (the DALI default, stated so nobody flips it): EXIF orientation
    # is applied, matching PIL.ImageOps.exif_transpose in the torchvision path.
    args = {"output_type": types.RGB, "adjust_orientation": True}
    if gpu:
        args.update(
            device="mixed",
            hw_decoder_load=hw_decoder_load,
            device_memory_padding=DEVICE_MEMORY_PADDING,
            host_memory_padding=HOST_MEMORY_PADDING,
            preallocate_width_hint=PREALLOCATE_WIDTH_HINT,
            preallocate_height_hint=PREALLOCATE_HEIGHT_HINT,
        )
    else:
        args["device"] = "cpu"
    return args


def _normalize(images, data: DataConfig, *, channels_last: bool, half: bool, mirror=None):
    """Flip (when `mirror` is given), normalise with data.mean and data.std, cast."""
    extra = {} if mirror is None else {"mirror": mirror}
    return fn.crop_mirror_normalize(
        images,
        mean=on_255_scale(data.mean),
        std=on_255_scale(data.std),
        # HWC gives NHWC batches; permuting them to NCHW in torch is a free channels_last view.
        output_layout="HWC" if channels_last else "CHW",
        dtype=types.FLOAT16 if half else types.FLOAT,
        **extra,
    )


def _read_shards(pieces: ShardPieces, **reader_args):
    """A sharded split's encoded images in the pieces' order (its labels are known from that order)."""
    # missing_component_behavior="error": a sample without its image stops the run, never skipped.
    return fn.readers.webdataset(paths=pieces.paths, index_paths=pieces.index_paths, ext=[DALI_IMAGE_EXT],
                                 missing_component_behavior="error", random_shuffle=False, name=READER, **reader_args)


def _train_graph(files: list[str] | ShardPieces, labels: list[int] | None, *, gpu: bool, data: DataConfig,
                 channels_last: bool, half: bool):
    # random_shuffle=False: the order is the epoch's exact permutation from sharding.py.
    if isinstance(files, ShardPieces):
        jpegs, labels_out = _read_shards(files), None
    else:
        jpegs, labels_out = fn.readers.file(files=files, labels=labels, random_shuffle=False, name=READER)
    # Decodes only the random crop's region of interest (less work than decode-then-crop).
    images = fn.decoders.image_random_crop(
        jpegs,
        random_area=[data.crop_scale_min, 1.0],
        random_aspect_ratio=list(TRAIN_ASPECT_RATIO),
        num_attempts=TRAIN_CROP_ATTEMPTS,
        **_decoder_args(gpu, data.hw_decoder_load),
    )
    images = fn.resize(images, resize_x=data.image_size, resize_y=data.image_size)  # antialiased linear
    images = apply_augment_policy(images, data)  # on uint8, before normalisation, as in the torchvision loader
    images = _normalize(images, data, channels_last=channels_last, half=half, mirror=fn.random.coin_flip(probability=0.5))
    return images if labels_out is None else (images, labels_out)


train_pipeline = pipeline_def(_train_graph)
# auto_aug's policies branch per sample, which needs DALI conditionals; converting the graph for them
# costs about 0.13 s per build on a CPU, so only a pipeline that augments pays it.
augmented_train_pipeline = pipeline_def(_train_graph, enable_conditionals=True)


@pipeline_def
def eval_pipeline(files: list[str] | ShardPieces, *, gpu: bool, data: DataConfig, channels_last: bool, half: bool):
    # Labels are positions in `files`; the loader maps them back to (label, sample index).
    # pad_last_batch=True repeats the last sample to fill the final batch (the iterator's
    # PARTIAL policy cuts those repeats off) and keeps the next pass aligned to sample 0.
    if isinstance(files, ShardPieces):  # positions are counted by the loader: the pieces' order is the shard's
        jpegs, positions = _read_shards(files, pad_last_batch=True), None
    else:
        jpegs, positions = fn.readers.file(
            files=files, labels=list(range(len(files))), random_shuffle=False, pad_last_batch=True, name=READER
        )
    images = fn.decoders.image(jpegs, **_decoder_args(gpu, data.hw_decoder_load))
    # "Resize the shorter side to R, centre-crop S" done as one resize of the centred source
    # square (side = shorter * S / R) straight to S x S: the same exact, sub-pixel geometry
    # as preprocessing.eval_crop_boxes (no rounding of the resized size or of the crop offset),
    # once per crop along the longer side (data.eval_crops).
    shape = images.shape(dtype=types.FLOAT)  # H, W, C after EXIF rotation; always a CPU node
    height, width = shape[0], shape[1]
    shorter = dali_math.min(height, width)
    side = shorter * eval_crop_side_fraction(data.eval_size, data.eval_crop_fraction)
    crops = []
    for position in eval_crop_positions(data.eval_crops):
        top = (height - side) * 0.5 + (position - 0.5) * (height - shorter)
        left = (width - side) * 0.5 + (position - 0.5) * (width - shorter)
        crop = fn.resize(images, size=[data.eval_size, data.eval_size],
                         roi_start=fn.stack(top, left), roi_end=fn.stack(top + side, left + side))  # (y, x), like `size`
        crops.append(_normalize(crop, data, channels_last=channels_last, half=half))
    images = crops[0] if len(crops) == 1 else fn.stack(*crops)  # several: K crops per sample, K first
    return images if positions is None else (images, positions)


class _Output:
    """Turns DALI's batch into the model's input: device, dtype and NCHW view."""

    def __init__(self, device: torch.device, dtype: torch.dtype, channels_last: bool):
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        # DALI has no bfloat16: emit float16 (half the bytes of float32 across PCIe on
        # the CPU-decode path) and cast once on the device. Normalised pixels lie in
        # about [-2.2, 2.7], where float16 is more precise than bfloat16, so nothing is lost.
        # On a CPU device nothing crosses PCIe, and float16 -> bfloat16 has no fast CPU path: emit float32 there.
        self.half = dtype == torch.float16 or (dtype == torch.bfloat16 and device.type == "cuda")

    def images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, dtype=self.dtype, non_blocking=True)
        if self.channels_last:  # N(K)HWC storage seen as N(K)CHW: channels_last, no copy
            images = images.movedim(-1, -3)
        return images


def _pipeline_args(data: DataConfig, *, gpu: bool, device: torch.device, seed: int) -> dict:
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
    return {
        "batch_size": data.batch_size,
        "num_threads": max(1, data.workers),
        "device_id": device_id,  # None: a CPU-only pipeline that never touches CUDA
        "seed": seed,
        "prefetch_queue_depth": data.prefetch,
    }


# One train pipeline serves about this many samples, i.e. several epochs of a small dataset.
SAMPLES_PER_PIPELINE = 100_000


class DaliTrainLoader(TrainLoader):
    """Training batches from a long-lived DALI pipeline that reads several epochs back to back.

    Building a pipeline on a GPU re-creates the decoder state and its pre-allocations. An H200
    run that rebuilt it at every epoch boundary waited for data 40% of the time; with one
    pipeline kept across epochs an H100 waited 12.7% (docs/BENCHMARKS.md). So
    one pipeline is given the exact orders of the next epochs
    in sequence (a shard is whole batches, so no batch straddles two epochs) and is rebuilt
    only after those epochs, or when the caller jumps elsewhere (a resume mid-epoch).
    The orders stay exact and resumable; the reader's own shuffle is neither.
    """

    def __init__(self, data: DataConfig, samples: Sequence[Sample], *, rank: int, world_size: int, seed: int,
                 gpu: bool, device: torch.device, dtype: torch.dtype, channels_last: bool):
        super().__init__(len(samples), rank=rank, world_size=world_size, seed=seed, batch_size=data.batch_size,
                         shards=shard_sizes(samples))
        self.epochs_per_pipeline = max(1, SAMPLES_PER_PIPELINE // max(1, self.batches_per_epoch * data.batch_size))
        self.pipelines_built = 0
        self._data, self._gpu, self._device = data, gpu, device
        self._files = [str(s.path) for s in samples]
        self._labels = [s.label for s in samples]
        # A sharded split: members read through index pieces; shard_check has read every image header.
        self._members = [s.member for s in samples] if self.shards is not None else None
        self._pieces = PieceWriter() if self._members is not None else None
        self._stream_labels: torch.Tensor | None = None  # a sharded stream's labels, in its order
        if self._members is None:
            # DALI decodes any size: refuse oversized images now, from their headers. Each rank reads
            # every world_size-th file, so together the ranks check each file once.
            check_pixel_limits(self._files[rank::world_size], data.max_pixels)
        self._output = _Output(device, dtype, channels_last)
        self._stream = None  # (iterator, pipeline) of the live pipeline
        self._stream_next: tuple[int, int] | None = None  # (epoch, batch) the live pipeline yields next
        self._stream_last_epoch = -1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, first = self.epoch, self.start_batch
        if first >= self.batches_per_epoch:
            return
        if self._stream is None or self._stream_next != (epoch, first):
            self._open_stream(epoch, first)
        iterator = self._stream[0]
        last_epoch = self._stream_last_epoch
        for index in range(first, self.batches_per_epoch):
            (batch,) = next(iterator)
            if self._stream_labels is not None:  # a sharded stream: batch n of the stream is its order's n-th slice
                batch["labels"] = self._stream_labels[self._stream_batches * self.batch_size:][: self.batch_size]
                self._stream_batches += 1
            # Advance the bookmark before handing the batch out: a caller that stops after any
            # batch (max_steps, a stop signal) leaves the stream exactly where the bookmark says.
            at_end = index + 1 == self.batches_per_epoch
            self._stream_next = (epoch + 1, 0) if at_end else (epoch, index + 1)
            if at_end and epoch == last_epoch:
                # every epoch this pipeline was given has been read: the next epoch opens a new one
                # (the old one is freed then, not now, while its last copy may still be in flight)
                self._stream_next = None
            labels = batch["labels"].reshape(-1).to(self._device, dtype=torch.int64, non_blocking=True)
            yield self._output.images(batch["images"]), labels

    def _open_stream(self, epoch: int, first_batch: int) -> None:
        self._close_stream()
        orders = [self.epoch_order(e) for e in range(epoch, epoch + self.epochs_per_pipeline)]
        order = np.concatenate(orders)[first_batch * self.batch_size:]
        factory = train_pipeline if self._data.augment == "none" else augmented_train_pipeline
        if self._members is not None:
            source, labels = self._pieces.write([self._members[i] for i in order]), None
            self._stream_labels = torch.tensor([self._labels[i] for i in order], dtype=torch.int64)
            self._stream_batches = 0
        else:
            source, labels = [self._files[i] for i in order], [self._labels[i] for i in order]
        pipe = factory(
            source, labels,
            gpu=self._gpu, data=self._data, channels_last=self._output.channels_last, half=self._output.half,
            **_pipeline_args(self._data, gpu=self._gpu, device=self._device,
                             seed=augmentation_seed(self.seed, rank=self.rank, epoch=epoch)),
        )
        pipe.build()
        self.pipelines_built += 1
        # Whole batches only, so DROP never drops anything; it is stated so a wrong count
        # would shorten the stream rather than pad it.
        outputs = ["images"] if self._members is not None else ["images", "labels"]
        iterator = DALIGenericIterator([pipe], outputs, reader_name=READER, last_batch_policy=LastBatchPolicy.DROP)
        self._stream, self._stream_next = (iterator, pipe), (epoch, first_batch)
        self._stream_last_epoch = epoch + self.epochs_per_pipeline - 1

    def _close_stream(self) -> None:
        self._stream, self._stream_next = None, None  # frees the pipeline's threads and buffers

    def close(self) -> None:
        self._close_stream()
        if self._pieces is not None:
            self._pieces.close()


class DaliEvalLoader(EvalLoader):
    """Evaluation batches of this rank's shard: every sample once, the last batch partial."""

    def __init__(self, data: DataConfig, samples: Sequence[Sample], *, rank: int, world_size: int,
                 gpu: bool, device: torch.device, dtype: torch.dtype, channels_last: bool):
        sharded = shard_sizes(samples) is not None
        super().__init__(len(samples), rank=rank, world_size=world_size, batch_size=data.batch_size, sharded=sharded)
        shard = self.shard
        self._output = _Output(device, dtype, channels_last)
        # position in the shard -> global sample index / true label, looked up after each batch
        self._indices = torch.as_tensor(shard, dtype=torch.int64)
        self._labels = torch.tensor([samples[i].label for i in shard], dtype=torch.int64)
        self._pieces = PieceWriter() if sharded else None
        if sharded:  # shard_check has read every image header
            self._files = self._pieces.write([samples[i].member for i in shard]) if len(shard) else None
        else:
            self._files = [str(samples[i].path) for i in shard]
            check_pixel_limits(self._files, data.max_pixels)  # DALI decodes any size: refuse oversized images now, from their headers
        self._pipeline_kwargs = dict(
            gpu=gpu, data=data, channels_last=channels_last, half=self._output.half,
            **_pipeline_args(data, gpu=gpu, device=device, seed=0),  # eval draws no random numbers
        )
        self._iterator = None  # kept between passes: evaluation runs every epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if not self.num_samples:  # a rank with no samples (more ranks than samples) yields nothing
            return
        iterator, self._iterator = self._iterator or self._new_iterator(), None  # a pass abandoned half-way is not reused
        start = 0
        for (batch,) in iterator:
            if self._pieces is not None:  # a sharded split's batches come in the shard order: count the positions
                count = batch["images"].shape[0]
                batch["positions"], start = torch.arange(start, start + count), start + count
            positions = batch["positions"].reshape(-1).to("cpu", dtype=torch.int64)
            labels = self._labels[positions].to(self._output.device, non_blocking=True)
            yield self._output.images(batch["images"]), labels, self._indices[positions]
        self._iterator = iterator  # a complete pass reset itself (auto_reset) and starts at sample 0

    def _new_iterator(self) -> DALIGenericIterator:
        pipe = eval_pipeline(self._files, **self._pipeline_kwargs)
        pipe.build()
        # PARTIAL: the padded repeats in the last batch are cut off, never counted twice.
        outputs = ["images"] if self._pieces is not None else ["images", "positions"]
        return DALIGenericIterator([pipe], outputs, reader_name=READER,
                                   last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)

    def close(self) -> None:
        self._iterator = None
        if self._pieces is not None:
            self._pieces.close()
