"""`carbrand bench data --epochs N`: per-batch latency over whole epochs, and the pipelines each loader built."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO
from tests.helpers.subprocesses import assert_ok, subprocess_environment


def bench_data(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "carbrand.cli", "bench", "data", *args], capture_output=True, text=True,
                          env=subprocess_environment(), cwd=REPO, timeout=600)


@pytest.mark.slow
def test_epochs_report_latency_percentiles_and_one_pipeline_per_loader(prepared_cars5, tmp_path):
    """266 train photos in batches of 32: 8 batches an epoch, 24 over 3 epochs. DALI serves the 3 epochs from one
    pipeline (the fix in dali_pipelines.py), the DataLoader from one persistent worker pool."""
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "latency.json"
    done = bench_data("--manifest", str(prepared_cars5), "--backends", "dali-cpu,torchvision", "--epochs", "3",
                      "--augment", "trivial", "--workers", "1", "--batch-size", "32", "--image-size", "32", "--cpu",
                      "--out", str(out))
    assert_ok(done)
    rows = {row["backend"]: row for row in json.loads(out.read_text())["results"]}
    assert sorted(rows) == ["dali-cpu", "torchvision"]
    for backend, row in rows.items():
        assert row["pipeline"] == "train" and row["augment"] == "trivial" and row["epochs"] == 3, row
        assert row["batches"] == 24 and row["images_per_run"] == 24 * 32, row
        assert 0 < row["latency_ms_p50"] <= row["latency_ms_p99"] <= row["latency_ms_max"], row
        assert row["epoch_first_batch_ms_max"] <= row["latency_ms_max"], row
        assert row["pipelines_built"] == 1, (backend, row["pipelines_built"])
        assert f"{backend:<11}" in done.stderr and "batch latency p50" in done.stderr


def test_fewer_than_three_epochs_is_a_usage_error(prepared_cars5):
    done = bench_data("--manifest", str(prepared_cars5), "--backends", "torchvision", "--epochs", "2", "--cpu")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--epochs must be >= 3" in lines[0], done.stderr
