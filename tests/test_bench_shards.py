"""`carbrand bench shards` and `bench shard-writing`: the figures docs/BENCHMARKS.md quotes come out of these."""

from __future__ import annotations

import argparse
import shutil

import pytest

from carbrand.bench import shard_reading, shard_writing


def test_shard_writing_reports_its_shards_rate_and_memory(tmp_path):
    result = shard_writing.measure(600, 0.25, str(tmp_path))  # in this process: the command spawns one for its memory figure
    assert result["samples"] == 600 and result["shards"] >= 2
    assert result["samples_per_second"] > 0 and result["peak_rss_mb"] >= result["peak_rss_before_samples_mb"] > 0
    assert not list(tmp_path.iterdir())  # the simulated shards are removed


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="bench shards counts opens with strace")
def test_bench_shards_counts_an_open_per_photo_from_files_and_per_reader_from_shards(prepared_cars5, tmp_path):
    args = argparse.Namespace(manifest=str(prepared_cars5), backends="torchvision", workers=1, batch_size=32, image_size=32,
                              epochs=1, shard_size_mb=256, photo_size=None, copies=1, work_dir=str(tmp_path))
    report = shard_reading.run_shard_reading_benchmark(args)
    files, shards = report["results"]
    assert (files["source"], shards["source"]) == ("files", "shards")
    assert files["images"] == shards["images"] == 256  # 266 training photos, whole batches of 32
    assert files["opens_per_epoch"] == 256  # one per photo read
    assert shards["opens_per_epoch"] == 1  # the one worker opens the one shard once
    assert files["seconds_per_epoch_at_5ms_per_open"] == pytest.approx(files["seconds"] + 256 * 0.005, abs=0.01)
