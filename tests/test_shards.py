"""`carbrand shard` and reading shards: the layout DALI reads, atomic and resumable writing, exact
orders across ranks, the same pixels as from the files, and every kind of bad shard named up front."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from carbrand.config import DataConfig
from carbrand.data.loader_base import shard_sizes
from carbrand.data.manifest import load_prepared
from carbrand.data.shard_check import check_split_shards
from carbrand.data.sharding import (
    eval_shard,
    sharded_train_shard,
    train_batches_per_epoch,
)
from carbrand.data.torch_loader import TorchEvalLoader, TorchTrainLoader
from carbrand.errors import DataError
from carbrand.prepare import shard_writer
from carbrand.prepare.shard_command import shard_dataset
from tests.helpers.paths import REPO
from tests.helpers.subprocesses import subprocess_environment

SHARD_MB = 1.0  # cars5's 266 training photos make 3 shards


@pytest.fixture(scope="module")
def sharded(prepared_cars5, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    shard_dataset(prepared_cars5, out, shard_size_mb=SHARD_MB, quiet=True)
    return out


def copy_of(sharded: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(sharded, tmp_path / "shards"))


def test_shards_hold_exactly_the_prepared_samples_in_the_webdataset_layout_dali_indexes(sharded, prepared_cars5, tmp_path):
    import wds2idx  # DALI's own index tool: our index files must be what it writes

    prepared, listing = load_prepared(prepared_cars5), json.loads((sharded / "shards.json").read_text())["splits"]
    dataset = load_prepared(sharded / "shards.json")  # the file names the dataset as well as its folder
    assert len(listing["train"]) >= 3
    for split, samples in prepared.splits.items():
        ours = dataset.split(split)
        assert sorted(str(s.path) for s in ours) == sorted(str(s.path) for s in samples)  # prepare's verdicts, nothing else
        assert sum(entry["samples"] for entry in listing[split]) == len(samples)
        for entry in listing[split]:
            tar = sharded / entry["name"]
            assert hashlib.sha256(tar.read_bytes()).hexdigest() == entry["sha256"]
            creator = wds2idx.IndexCreator(str(tar), str(tmp_path / "reference.idx"), verbose=False)
            creator.create_index()
            creator.close()
            assert (sharded / entry["index"]).read_text() == (tmp_path / "reference.idx").read_text()
    sample = dataset.split("train")[5]
    with tarfile.open(sample.member.shard) as tar:
        key = sample.member.name.split(".")[0]
        assert [m.name for m in tar.getmembers() if m.name.startswith(key)] == [f"{key}.jpg", f"{key}.cls", f"{key}.json"]
        assert tar.extractfile(f"{key}.jpg").read() == sample.path.read_bytes()  # the photo's bytes, unchanged
        assert tar.extractfile(f"{key}.cls").read() == str(sample.label).encode()
        assert json.loads(tar.extractfile(f"{key}.json").read()) == {"brand": sample.brand, "label": sample.label,
                                                                     "path": str(sample.path)}


def test_a_killed_write_leaves_no_complete_looking_shard_and_a_rerun_finishes_with_the_same_bytes(sharded, prepared_cars5,
                                                                                                  tmp_path, monkeypatch):
    out, real = tmp_path / "out", shard_writer.sample_members
    calls = []

    def dies_at_the_200th_sample(*args, **kwargs):
        calls.append(1)
        if len(calls) == 200:  # inside the train split's third shard
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(shard_writer, "sample_members", dies_at_the_200th_sample)
    with pytest.raises(KeyboardInterrupt):
        shard_dataset(prepared_cars5, out, shard_size_mb=SHARD_MB, quiet=True)
    monkeypatch.setattr(shard_writer, "sample_members", real)
    assert not (out / "shards.json").exists() and not list(out.rglob(".tmp-*"))
    complete = sorted(p.name for p in (out / "train").glob("*.tar"))
    assert complete == ["shard-000000.tar", "shard-000001.tar"]  # the interrupted third is not there under its name
    with pytest.raises(DataError, match="holds other photos"):  # another order is not resumed into these shards
        shard_dataset(prepared_cars5, out, shard_size_mb=SHARD_MB, seed=1, quiet=True)
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == complete
    (out / "train" / ".tmp-shard-000002.tar").write_bytes(b"half")  # what a kill -9 leaves

    stats = shard_dataset(prepared_cars5, out, shard_size_mb=SHARD_MB, quiet=True)
    total = sum(len(s) for s in load_prepared(prepared_cars5).splits.values())
    assert 0 < stats.samples_kept < 200 and stats.samples_kept + stats.samples_written == total
    assert json.loads((out / "shards.json").read_text())["splits"] == json.loads((sharded / "shards.json").read_text())["splits"]
    assert not list(out.rglob(".tmp-*"))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_an_epoch_of_shards_trains_on_every_sample_once_across_ranks_each_rank_on_its_own_shards(world_size):
    sizes, batch_size = [37, 40, 40, 12, 40], 4  # 169 samples
    total = sum(sizes)
    per_rank = train_batches_per_epoch(total, world_size=world_size, batch_size=batch_size) * batch_size
    shard_of = np.repeat(np.arange(len(sizes)), sizes)
    for epoch in (0, 1):
        ranks = [sharded_train_shard(sizes, seed=7, epoch=epoch, rank=r, world_size=world_size, batch_size=batch_size)
                 for r in range(world_size)]
        seen = np.concatenate(ranks)
        assert all(len(r) == per_rank for r in ranks)
        assert len(np.unique(seen)) == len(seen) == world_size * per_rank  # none twice
        assert total - len(seen) < world_size * batch_size  # left out: less than one global batch, as with files
        for order in ranks:  # read shard after shard: at most one change of shard more than the shards it touches
            changes = int(np.count_nonzero(np.diff(shard_of[order])))
            assert changes == len(np.unique(shard_of[order])) - 1
    assert not np.array_equal(sharded_train_shard(sizes, seed=7, epoch=0, rank=0, world_size=1, batch_size=4),
                              sharded_train_shard(sizes, seed=7, epoch=1, rank=0, world_size=1, batch_size=4))
    evaluated = np.concatenate([eval_shard(total, rank=r, world_size=world_size, contiguous=True) for r in range(world_size)])
    assert np.array_equal(evaluated, np.arange(total))


def loader_options(rank=0, world_size=1):
    return dict(rank=rank, world_size=world_size, device=torch.device("cpu"), dtype=torch.float32, channels_last=False)


def test_the_torchvision_loader_reads_the_same_pixels_from_shards_and_resumes_mid_epoch_exactly(sharded, prepared_cars5):
    data = DataConfig(manifest=str(sharded), batch_size=8, workers=0, image_size=32)
    files, shards = load_prepared(prepared_cars5).split("test"), load_prepared(sharded).split("test")
    by_path = {str(s.path): i for i, s in enumerate(files)}
    from_files = torch.cat([b[0] for b in TorchEvalLoader(data, files, **loader_options())])
    from_shards = [(images, indices) for images, _, indices in TorchEvalLoader(data, shards, **loader_options())]
    for images, indices in from_shards:
        same = [by_path[str(shards[i].path)] for i in indices]
        assert torch.equal(images, from_files[same])

    train = load_prepared(sharded).split("train")
    loader = TorchTrainLoader(data, train, seed=3, **loader_options(rank=1, world_size=2))
    assert loader.shards == shard_sizes(train) and len(loader.shards) == 3
    loader.set_epoch(1)
    straight = list(loader)
    loader.set_epoch(1, start_batch=5)
    resumed = list(loader)
    assert len(resumed) == len(straight) - 5
    for (a, la), (b, lb) in zip(straight[5:], resumed):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_the_dali_loaders_read_shards_in_the_exact_order_with_the_files_pixels(sharded, prepared_cars5):
    from carbrand.data.dali_pipelines import DaliEvalLoader, DaliTrainLoader

    data = DataConfig(manifest=str(sharded), batch_size=8, workers=1, image_size=32)
    files, shards = load_prepared(prepared_cars5).split("test"), load_prepared(sharded).split("test")
    by_path = {str(s.path): i for i, s in enumerate(files)}
    loader = DaliEvalLoader(data, files, gpu=False, **loader_options())
    from_files = torch.cat([b[0] for b in loader])
    loader.close()
    for rank in (0, 1):
        loader = DaliEvalLoader(data, shards, gpu=False, **loader_options(rank=rank, world_size=2))
        for _ in range(2):  # a second pass (evaluation every epoch) counts from sample 0 again
            batches = list(loader)
            indices = torch.cat([b[2] for b in batches])
            assert indices.tolist() == eval_shard(len(shards), rank=rank, world_size=2, contiguous=True).tolist()
            assert torch.equal(torch.cat([b[1] for b in batches]), torch.tensor([shards[i].label for i in indices]))
            same = [by_path[str(shards[i].path)] for i in indices]
            assert torch.equal(torch.cat([b[0] for b in batches]), from_files[same])
        loader.close()

    train = load_prepared(sharded).split("train")
    loader = DaliTrainLoader(data, train, seed=3, gpu=False, **loader_options(rank=1, world_size=2))
    for epoch, start in ((0, 0), (1, 0), (1, 3)):  # (1, 3): resumed mid-epoch, the order goes on where it stopped
        loader.set_epoch(epoch, start_batch=start)
        labels = torch.cat([b[1] for b in loader])
        assert labels.tolist() == [train[i].label for i in loader.epoch_order(epoch)[start * 8:]]
    loader.close()


def damage(shards: Path, how: str) -> str:
    """Damage the first training shard as `how` says; the member (or file) the error must name."""
    listing = json.loads((shards / "shards.json").read_text())
    entry = listing["splits"]["train"][0]
    tar, index = shards / entry["name"], shards / entry["index"]
    first = index.read_text().splitlines()[1].split()  # jpg <offset> <size> <name> cls ...
    offset, size, name = int(first[1]), int(first[2]), first[3]
    data = bytearray(tar.read_bytes())
    if how == "truncated":
        tar.write_bytes(data[: len(data) // 2])
        return str(tar)
    if how == "missing index":
        index.unlink()
        return str(index)
    if how == "checksum":
        data[offset + size // 2] ^= 0xFF  # a flipped byte inside the photo: the JPEG header still reads
        tar.write_bytes(bytes(data))
        return str(tar)
    if how == "not a jpeg":  # written by some other tool: its checksum recorded, the member is text
        data[offset:offset + size] = b"not a photo".ljust(size, b" ")
        tar.write_bytes(bytes(data))
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        (shards / "shards.json").write_text(json.dumps(listing))
        return f"{tar}:{name}"
    raise AssertionError(how)


@pytest.mark.parametrize("how, says", [("truncated", "truncated"), ("missing index", "index missing"),
                                       ("checksum", "sha256 differs"), ("not a jpeg", "not an image")])
def test_a_bad_shard_stops_before_training_with_one_line_naming_it(sharded, tmp_path, how, says):
    shards = copy_of(sharded, tmp_path)
    named = damage(shards, how)
    with pytest.raises(DataError) as error:
        # what the trainer and evaluator do first: read the dataset (every rank), then check its part of the shards
        for rank in (0, 1):
            check_split_shards(load_prepared(shards).split("train"), rank=rank, world_size=2, max_pixels=0)
    message = str(error.value)
    assert "\n" not in message and named in message and says in message, message


def test_evaluate_on_a_bad_shard_exits_1_with_one_line(sharded, fitted_cars5_export, tmp_path):
    shards = copy_of(sharded, tmp_path)
    named = damage(shards, "truncated")
    result = subprocess.run([sys.executable, "-m", "carbrand.cli", "evaluate", "--checkpoint", str(fitted_cars5_export),
                             "--data", str(shards), "--split", "train", "--out", str(tmp_path / "eval")],
                            capture_output=True, text=True, timeout=300, env=subprocess_environment(), cwd=REPO)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "truncated" in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "eval").exists()


def test_the_reports_gallery_reads_a_sharded_datasets_photos_from_their_shards(sharded):
    """On a cluster only the shards may be there: the worst-mistakes gallery must not need the source photos."""
    from carbrand.evaluation.html_report import build_gallery
    from carbrand.evaluation.report import SampleRecord, ScoredSample

    sample = load_prepared(sharded).split("test")[0]
    record = SampleRecord(index=0, predicted=(sample.label + 1) % 5, confidence=0.9, true_probability=0.05, topk=(0,),
                          topk_probabilities=(0.9,))
    scored = ScoredSample(path="/gone/photo.jpg", true_brand=sample.brand, target=sample.label, record=record,
                          member=sample.member)
    gallery = build_gallery([scored], load_prepared(sharded).classes, per_brand=1, explain=None)
    (item,) = gallery[0].items
    assert item.error is None and item.thumbnail[:2] == b"\xff\xd8"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dali_gpu_decode_reads_shards_in_the_exact_order(sharded):
    """The production path: the mixed decoder behind fn.readers.webdataset, train and eval (tests/run_gpu_checks.sh)."""
    from carbrand.data.dali_pipelines import DaliEvalLoader, DaliTrainLoader

    data = DataConfig(manifest=str(sharded), batch_size=8, workers=2, image_size=64)
    options = dict(device=torch.device("cuda", 0), dtype=torch.float16, channels_last=True)
    train = load_prepared(sharded).split("train")
    loader = DaliTrainLoader(data, train, seed=3, gpu=True, rank=0, world_size=2, **options)
    loader.set_epoch(1, start_batch=2)
    batches = list(loader)
    assert batches[0][0].is_cuda and batches[0][0].shape == (8, 3, 64, 64)
    assert torch.cat([b[1] for b in batches]).tolist() == [train[i].label for i in loader.epoch_order(1)[16:]]
    loader.close()
    test = load_prepared(sharded).split("test")
    loader = DaliEvalLoader(data, test, gpu=True, rank=1, world_size=2, **options)
    indices = torch.cat([b[2] for b in loader])
    assert indices.tolist() == eval_shard(len(test), rank=1, world_size=2, contiguous=True).tolist()
    loader.close()
