"""Loaders on real cars5 photos, CPU only: DALI (decode=cpu) and the torchvision fallback."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carbrand.config import DataConfig
from carbrand.data.loaders import build_eval_loader, build_train_loader, resolve_backend
from carbrand.data.manifest import Sample
from carbrand.data.sharding import train_shard
from carbrand.errors import DataError, UsageError

BACKENDS = ["dali", "torchvision"]
CPU = torch.device("cpu")
SIZE = 64


@pytest.fixture
def cars5(cars5_dir: Path) -> Path:
    return cars5_dir  # tests/conftest.py: the shared photos, wherever CARBRAND_TEST_DATA puts them


def read_split(root: Path) -> list[Sample]:
    brands = sorted(p.name for p in root.iterdir() if p.is_dir())
    return [Sample(path=p, label=brands.index(p.parent.name), brand=p.parent.name) for p in sorted(root.glob("*/*.jpg"))]


def numbered(samples: list[Sample]) -> list[Sample]:
    """Each sample's label is its own index, so a batch's labels say exactly which files it holds."""
    return [dataclasses.replace(s, label=i) for i, s in enumerate(samples)]


def config(loader: str, **overrides) -> DataConfig:
    # Threads / workers: DALI gets 2 threads; torchvision runs 2 worker processes in one test
    # (see test_torchvision_workers_...) and in-process elsewhere to keep the suite fast.
    values = dict(loader=loader, decode="cpu", image_size=SIZE, batch_size=8, workers=2 if loader == "dali" else 0)
    return DataConfig(**(values | overrides))


def train_loader(data: DataConfig, samples, *, rank=0, world_size=1, seed=0, dtype=torch.float32, channels_last=True):
    return build_train_loader(data, samples, backend=resolve_backend(data, CPU), rank=rank, world_size=world_size, seed=seed, device=CPU, dtype=dtype,
                              channels_last=channels_last)


def eval_loader(data: DataConfig, samples, *, rank=0, world_size=1, dtype=torch.float32, channels_last=True):
    return build_eval_loader(data, samples, backend=resolve_backend(data, CPU), rank=rank, world_size=world_size, device=CPU, dtype=dtype,
                             channels_last=channels_last)


def epoch_labels(loader) -> list[int]:
    return [label for _, labels in loader for label in labels.tolist()]


def eval_images(loader) -> tuple[torch.Tensor, list[int]]:
    batches = list(loader)
    return torch.cat([images.float() for images, _, _ in batches]), [i for _, _, idx in batches for i in idx.tolist()]


def rotated_copy_with_exif(source: Path, target: Path) -> None:
    """Store the photo turned 90 degrees counter-clockwise, tagged 'rotate 90 CW to display' (6)."""
    image = Image.open(source)
    exif = image.getexif()
    exif[0x0112] = 6
    image.transpose(Image.Transpose.ROTATE_90).save(target, quality=95, exif=exif.tobytes())


# --- evaluation --------------------------------------------------------------------------------


@pytest.mark.parametrize("crops", [1, 3])
def test_dali_and_torchvision_eval_agree_on_real_photos(cars5, tmp_path, crops):
    """Also with 3 crops along the longer side (data.eval_crops): the same boxes, start to end, in both loaders."""
    samples = read_split(cars5 / "test")[::4]  # 25 photos of all five brands
    # One photo whose pixels are stored rotated with an EXIF orientation tag: both paths
    # must turn it upright (DALI adjust_orientation, PIL exif_transpose).
    rotated = tmp_path / "rotated.jpg"
    rotated_copy_with_exif(samples[0].path, rotated)
    samples.append(dataclasses.replace(samples[0], path=rotated))
    dali, dali_order = eval_images(eval_loader(config("dali", eval_crops=crops), samples))
    torchvision, tv_order = eval_images(eval_loader(config("torchvision", eval_crops=crops), samples))
    assert dali_order == tv_order == list(range(len(samples)))
    if crops > 1:
        assert dali.shape == torchvision.shape == (len(samples), crops, 3, SIZE, SIZE)
        centre, _ = eval_images(eval_loader(config("torchvision"), samples))
        assert torch.equal(torchvision[:, crops // 2], centre), "the middle crop is not the centre crop"
        # the end crops of a landscape photo see other parts of it (a square photo's crops are all one)
        sizes = [Image.open(sample.path).size for sample in samples]
        wide = [index for index, (width, height) in enumerate(sizes) if width > 1.2 * height]
        assert len(wide) > len(samples) // 2
        assert (torchvision[wide, 0] - torchvision[wide, -1]).abs().flatten(1).mean(1).min() > 0.05
        dali, torchvision = dali.flatten(0, 1), torchvision.flatten(0, 1)
    assert dali.shape == torchvision.shape == (len(samples) * crops, 3, SIZE, SIZE)
    # Measured: mean |diff| 0.002 per normalised pixel, correlation >= 0.99995 (both do one
    # antialiased bilinear resize of the same sub-pixel box; JPEG decoders agree exactly).
    # A one-pixel shift of the crop drops the correlation to about 0.9 on these photos.
    difference = (dali - torchvision).abs().flatten(1).mean(1)
    assert difference.max() < 0.02, difference
    for a, b in zip(dali, torchvision):
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.999
    # The rotated copy (re-encoded JPEG, so not bit-exact) looks like the upright original.
    assert (dali[-crops:] - dali[:crops]).abs().mean() < 0.1
    assert (torchvision[-crops:] - torchvision[:crops]).abs().mean() < 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_ranks_cover_the_split_exactly_once(cars5, backend):
    samples = read_split(cars5 / "test")[:37]  # 19 + 18 per rank: batches of 8 leave partial ones
    seen = []
    for rank in range(2):
        loader = eval_loader(config(backend), samples, rank=rank, world_size=2)
        assert loader.num_samples == (19, 18)[rank]
        assert len(loader) == 3
        for _ in range(2):  # a second pass (the next epoch's validation) must be identical
            batches = list(loader)
            assert [len(idx) for _, _, idx in batches] == [8, 8, loader.num_samples - 16]
            indices = [i for _, _, idx in batches for i in idx.tolist()]
            labels = [label for _, labels, _ in batches for label in labels.tolist()]
            assert labels == [samples[i].label for i in indices]
            assert all(images.is_contiguous(memory_format=torch.channels_last) for images, _, _ in batches)
        seen += indices
        loader.close()
    assert sorted(seen) == list(range(len(samples)))  # union is the split: no duplicates, none missing


def test_dali_eval_pass_abandoned_half_way_restarts_at_the_first_sample(cars5):
    samples = read_split(cars5 / "test")[:20]
    loader = eval_loader(config("dali"), samples)
    next(iter(loader))
    assert eval_images(loader)[1] == list(range(20))


def test_rank_without_eval_samples_yields_nothing(cars5):
    samples = read_split(cars5 / "test")[:1]
    loader = eval_loader(config("dali"), samples, rank=1, world_size=2)
    assert loader.num_samples == 0 and len(loader) == 0 and list(loader) == []


# --- training ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_train_batches_shape_dtype_layout_values_and_labels(cars5, backend, dtype):
    samples = read_split(cars5 / "train")[::3]  # 100 photos
    loader = train_loader(config(backend), samples, rank=1, world_size=2, seed=3, dtype=dtype)
    assert loader.batches_per_epoch == len(loader) == 6  # 50 per rank // 8
    labels = []
    for images, batch_labels in loader:
        assert images.shape == (8, 3, SIZE, SIZE) and images.dtype == dtype and images.device == CPU
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert batch_labels.dtype == torch.int64
        values = images.float()
        # Normalised ImageNet range is [-2.12, 2.64]; a real photo spans most of it.
        assert -2.2 < values.min() < -1.0 and 1.5 < values.max() < 2.7
        assert abs(values.mean()) < 1.0
        labels += batch_labels.tolist()
    order = train_shard(len(samples), seed=3, epoch=0, rank=1, world_size=2, batch_size=8)
    assert labels == [samples[i].label for i in order]
    assert set(labels) <= set(range(5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_channels_first_when_asked(cars5, backend):
    samples = read_split(cars5 / "train")[:16]
    images, _ = next(iter(train_loader(config(backend), samples, channels_last=False)))
    assert images.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_epochs_visit_each_sample_once_in_a_seeded_order(cars5, backend):
    samples = numbered(read_split(cars5 / "train")[:60])
    loader = train_loader(config(backend), samples, rank=0, world_size=2, seed=5)
    first = epoch_labels(loader)
    assert len(first) == 24 and len(set(first)) == 24  # 30 per rank -> 3 full batches, no repeats
    assert first == train_shard(60, seed=5, epoch=0, rank=0, world_size=2, batch_size=8).tolist()
    other_rank = epoch_labels(train_loader(config(backend), samples, rank=1, world_size=2, seed=5))
    assert not set(first) & set(other_rank)
    loader.set_epoch(1)
    second = epoch_labels(loader)
    assert second != first and len(set(second)) == 24
    again = train_loader(config(backend), samples, rank=0, world_size=2, seed=5)
    assert epoch_labels(again) == first  # same seed, same order (a restarted run repeats it)


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_epoch_with_start_batch_yields_the_rest_of_that_epoch(cars5, backend):
    samples = numbered(read_split(cars5 / "train")[:64])
    loader = train_loader(config(backend), samples, seed=1)
    loader.set_epoch(2)
    full = epoch_labels(loader)
    loader.set_epoch(2, start_batch=3)
    assert len(loader) == loader.batches_per_epoch - 3 == 5
    assert epoch_labels(loader) == full[3 * 8:]
    loader.set_epoch(2, start_batch=8)
    assert len(loader) == 0 and epoch_labels(loader) == []
    with pytest.raises(ValueError):
        loader.set_epoch(2, start_batch=9)


def test_dali_train_pipeline_lives_across_epochs_and_keeps_every_order_exact(cars5):
    """One pipeline reads several epochs back to back (a rebuild per epoch starved an H200 of data)."""
    samples = numbered(read_split(cars5 / "train")[:32])
    expected = [train_shard(32, seed=3, epoch=e, rank=0, world_size=1, batch_size=8).tolist() for e in range(5)]
    loader = train_loader(config("dali"), samples, seed=3)
    loader.epochs_per_pipeline = 3  # as if the dataset were large: the 4th epoch needs a new pipeline
    for epoch in range(5):
        loader.set_epoch(epoch)
        batches = iter(loader)
        # consume exactly the epoch's batches, as the trainer does (the generator is left suspended)
        labels = [label for _ in range(len(loader)) for label in next(batches)[1].tolist()]
        assert labels == expected[epoch]
    assert loader.pipelines_built == 2
    # stopping mid-epoch and going on from the same place keeps the pipeline
    loader.set_epoch(5)
    batches = iter(loader)
    next(batches)
    loader.set_epoch(5, start_batch=1)
    rest = epoch_labels(loader)
    assert rest == train_shard(32, seed=3, epoch=5, rank=0, world_size=1, batch_size=8).tolist()[8:]
    assert loader.pipelines_built == 2  # the second pipeline holds epochs 3, 4 and 5
    # jumping elsewhere (a resume) opens a pipeline at that exact place
    loader.set_epoch(1, start_batch=2)
    assert epoch_labels(loader) == expected[1][16:]
    assert loader.pipelines_built == 3


def test_torchvision_resume_repeats_the_exact_crops_with_workers(cars5):
    samples = read_split(cars5 / "train")[:32]
    data = config("torchvision", workers=2, prefetch=1)
    loader = train_loader(data, samples, seed=4)
    full = [images for images, _ in loader]
    loader.set_epoch(0, start_batch=2)
    rest = [images for images, _ in loader]
    loader.close()
    assert len(rest) == 2 and all(torch.equal(a, b) for a, b in zip(full[2:], rest))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_agree_on_batches_per_epoch_and_tiny_splits_fail(cars5, backend):
    samples = read_split(cars5 / "train")[:75]
    counts = {train_loader(config(backend), samples, rank=r, world_size=2).batches_per_epoch for r in range(2)}
    assert counts == {4}  # 37 or 38 per rank before the cut, 4 full batches each
    with pytest.raises(DataError, match="15 samples, fewer than one global batch"):
        train_loader(config(backend), samples[:15], world_size=2)


# --- file names, backend choice, GPU -----------------------------------------------------------


def test_dali_reads_file_names_with_awkward_characters(cars5, tmp_path):
    source = read_split(cars5 / "test")[:2]
    folder = tmp_path / "brand (estate), ü"
    folder.mkdir()
    awkward = []
    for sample, name in zip(source, ["Mercedes-Benz (W123), 1979 Coupé.jpg", "日本 car #2, copy  .jpg"]):
        shutil.copy(sample.path, folder / name)
        awkward.append(dataclasses.replace(sample, path=folder / name))
    images, order = eval_images(eval_loader(config("dali"), awkward))
    reference, _ = eval_images(eval_loader(config("dali"), source))
    assert order == [0, 1] and torch.equal(images, reference)
    assert len(epoch_labels(train_loader(config("dali", batch_size=2), awkward))) == 2


@pytest.mark.parametrize("kind", ["eval", "train"])
def test_dali_loaders_refuse_an_image_over_the_pixel_limit_when_built(kind, cars5, tmp_path, monkeypatch):
    """DALI decodes any size: the headers of the loader's files are checked before a pipeline exists."""
    from tests.helpers.image_factory import write_jpeg

    # Lowered: cars5's largest photo has 262,094 pixels; the generated image has one column too many.
    monkeypatch.setattr("carbrand.data.preprocessing.MAX_PIXELS", 600 * 500)  # the one constant
    huge = write_jpeg(tmp_path / "huge.jpg", seed=1, size=(601, 500))
    samples = read_split(cars5 / "test")[:8] + [Sample(path=huge, label=0, brand="audi")]
    build = eval_loader if kind == "eval" else train_loader
    with pytest.raises(DataError) as error:
        build(config("dali"), samples)
    assert str(error.value) == f"{huge}: 601x500 = 300500 pixels is over the limit of 300000 pixels (prepare --max-pixels)"
    build(config("dali"), samples[:-1]).close()  # the real photos alone are fine


def test_resolve_backend_choices_and_errors(monkeypatch):
    assert resolve_backend(DataConfig(loader="auto", decode="auto"), CPU) == ("dali", "cpu")
    assert resolve_backend(DataConfig(loader="dali", decode="auto"), torch.device("cuda", 0)) == ("dali", "gpu")
    assert resolve_backend(DataConfig(loader="torchvision", decode="auto"), torch.device("cuda", 0)) == ("torchvision", "cpu")
    # auto with CPU decode: DALI up to 4 threads, torchvision's worker processes beyond (measured, docs/BENCHMARKS.md)
    assert resolve_backend(DataConfig(loader="auto", workers=4), CPU) == ("dali", "cpu")
    assert resolve_backend(DataConfig(loader="auto", workers=16), CPU) == ("torchvision", "cpu")
    assert resolve_backend(DataConfig(loader="auto", workers=16, decode="cpu"), torch.device("cuda", 0)) == ("torchvision", "cpu")
    assert resolve_backend(DataConfig(loader="auto", workers=16), torch.device("cuda", 0)) == ("dali", "gpu")
    assert resolve_backend(DataConfig(loader="dali", workers=16), CPU) == ("dali", "cpu")  # asked for: kept
    with pytest.raises(UsageError, match="data.decode"):
        resolve_backend(DataConfig(decode="gpu"), CPU)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # `import nvidia.dali` now raises ImportError
    with pytest.raises(UsageError, match=r"data.loader.*pip install carbrand\[dali\]"):
        resolve_backend(DataConfig(loader="dali"), CPU)
    assert resolve_backend(DataConfig(loader="auto", decode="auto"), CPU) == ("torchvision", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dali_gpu_decode_matches_cpu_decode(cars5, dtype):
    device = torch.device("cuda", 0)
    samples = read_split(cars5 / "test")[:20]
    data = config("dali", decode="gpu")
    gpu = build_eval_loader(data, samples, backend=resolve_backend(data, device), rank=0, world_size=1, device=device, dtype=dtype, channels_last=True)
    batches = list(gpu)
    assert all(images.device == device and images.dtype == dtype for images, _, _ in batches)
    assert all(images.is_contiguous(memory_format=torch.channels_last) for images, _, _ in batches)
    on_gpu = torch.cat([images.float().cpu() for images, _, _ in batches])
    on_cpu, _ = eval_images(eval_loader(config("dali"), samples))
    # nvJPEG and libjpeg-turbo differ slightly (chroma upsampling, IDCT); the picture must not.
    assert (on_gpu - on_cpu).abs().mean() < 0.05
    train = build_train_loader(data, read_split(cars5 / "train")[:40], backend=resolve_backend(data, device), rank=0, world_size=1, seed=0, device=device,
                               dtype=dtype, channels_last=True)
    for images, labels in train:
        assert images.shape == (8, 3, SIZE, SIZE) and images.device == device and labels.device == device
        assert images.is_contiguous(memory_format=torch.channels_last)
    assert np.isfinite(on_gpu.numpy()).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dali_gpu_decode_makes_the_same_three_crops_as_cpu_decode(cars5):
    """data.eval_crops 3 on the GPU: the crops stacked per photo, each an NCHW channels-last image, as on the CPU."""
    device = torch.device("cuda", 0)
    samples = read_split(cars5 / "test")[:20]
    data = config("dali", decode="gpu", eval_crops=3)
    gpu = build_eval_loader(data, samples, backend=resolve_backend(data, device), rank=0, world_size=1, device=device,
                            dtype=torch.bfloat16, channels_last=True)
    batches = [images for images, _, _ in gpu]
    assert all(images.shape[1:] == (3, 3, SIZE, SIZE) and images.device == device for images in batches)
    assert all(images.flatten(0, 1).is_contiguous(memory_format=torch.channels_last) for images in batches)
    on_gpu = torch.cat([images.float().cpu() for images in batches])
    on_cpu, _ = eval_images(eval_loader(config("dali", eval_crops=3), samples))
    assert on_gpu.shape == on_cpu.shape == (len(samples), 3, 3, SIZE, SIZE)
    assert (on_gpu - on_cpu).abs().flatten(2).mean(2).max() < 0.05  # every crop of every photo, not only on average
