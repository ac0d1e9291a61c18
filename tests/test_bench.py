"""`carbrand bench data|train` on the real cars5 photos, tiny settings: the figures come out as
JSON, comparisons pair the right runs, and bad requests fail with one line and exit 2."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from PIL import Image
from tests.helpers.paths import REPO
from tests.helpers.subprocesses import assert_ok, subprocess_environment
from tests.helpers.training_runs import CPU_RECIPE

from carbrand.bench.photo_set import build_photo_set, describe
from carbrand.data.manifest import load_prepared


def bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "carbrand.cli", "bench", *args], capture_output=True, text=True,
                          env=subprocess_environment(), cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def photo_set(prepared_cars5, tmp_path_factory):
    return build_photo_set(prepared_cars5, tmp_path_factory.mktemp("bench") / "set", (80, 60), copies=2)


def test_photo_set_reencodes_every_photo_at_the_size_with_distinct_copies(prepared_cars5, photo_set):
    source, derived = load_prepared(prepared_cars5), load_prepared(photo_set)
    assert derived.classes == source.classes
    for split, samples in source.splits.items():
        copies = derived.split(split)
        assert len(copies) == 2 * len(samples)
        assert [s.label for s in copies] == [s.label for s in samples for _ in range(2)]
    train = derived.split("train")
    with Image.open(train[0].path) as image:
        assert image.size == (80, 60) and image.format == "JPEG"
    digests = [hashlib.sha1(s.path.read_bytes()).hexdigest() for s in train]
    # the copies of one photo differ (cars5 itself holds a few exact duplicates, so compare within a photo)
    assert all(digests[i] != digests[i + 1] for i in range(0, len(digests), 2)), "two copies have the same bytes"
    assert describe(photo_set) == "cars5 re-encoded at 80x60 (x2 copies)"
    assert describe(prepared_cars5) == "cars5 photos as prepared"
    before = train[0].path.stat().st_mtime_ns
    build_photo_set(prepared_cars5, photo_set, (80, 60), copies=2)  # same recipe: reused, not rewritten
    assert train[0].path.stat().st_mtime_ns == before


def test_bench_data_measures_each_backend_and_compares_with_torchvision(photo_set, tmp_path):
    out = tmp_path / "data.json"
    done = bench("data", "--manifest", str(photo_set), "--backends", "dali-cpu,torchvision", "--pipelines", "train,eval",
                 "--workers", "1", "--batch-size", "8", "--image-size", "32", "--batches", "3", "--warmup-batches", "1",
                 "--out", str(out))
    assert_ok(done)
    report = json.loads(out.read_text())
    assert json.loads(done.stdout) == report
    rows = {(r["pipeline"], r["backend"]): r for r in report["results"]}
    assert set(rows) == {(p, b) for p in ("train", "eval") for b in ("dali-cpu", "torchvision")}
    for row in rows.values():
        assert row["images_per_run"] == 24 and row["images_per_second"] > 0
        assert row["dataset"] == "cars5 re-encoded at 80x60 (x2 copies)"
    ratio = next(r for r in report["ratios"] if r["pipeline"] == "train" and r["backend"] == "dali-cpu")
    expected = rows[("train", "dali-cpu")]["images_per_second"] / rows[("train", "torchvision")]["images_per_second"]
    assert ratio["ratio"] == pytest.approx(expected, rel=1e-2)


def test_bench_train_runs_real_memory_and_bare_and_pairs_them(prepared_cars5, tmp_path):
    out = tmp_path / "train.json"
    done = bench("train", "--config", str(CPU_RECIPE), f"data.manifest={prepared_cars5}", "data.image_size=32",
                 "data.batch_size=8", "--precisions", "no", "--steps", "4", "--warmup-steps", "2", "--out", str(out))
    assert_ok(done)
    report = json.loads(out.read_text())
    assert (report["arch"], report["batch_size"], report["image_size"]) == ("resnet18", 8, 32)
    rates = {r["measure"]: r for r in report["results"]}
    assert set(rates) == {"real", "memory", "bare"}
    assert all(r["images_per_second"] > 0 and r["peak_host_memory_gb"] > 0 for r in rates.values())
    assert rates["memory"]["data_wait_fraction"] < 0.05 and rates["bare"]["data_wait_fraction"] == 0
    pairs = {c["what"]: c["ratio"] for c in report["comparisons"]}
    assert pairs["real loader / in-memory batch"] == pytest.approx(
        rates["real"]["images_per_second"] / rates["memory"]["images_per_second"], rel=1e-2)
    assert pairs["product loop / bare loop"] == pytest.approx(
        rates["memory"]["images_per_second"] / rates["bare"]["images_per_second"], rel=1e-2)


@pytest.mark.parametrize("args, message, exit_code", [
    (("train", "--config", str(CPU_RECIPE), "--precisions", "fp16"), "fp16 needs a CUDA GPU", 2),
    (("train", "--config", str(CPU_RECIPE), "--channels-last", "maybe"), "--channels-last takes", 2),
    (("train", "--config", str(CPU_RECIPE), "data.colour=red"), "unknown config key 'data.colour'", 2),
    (("data", "--manifest", "/nonexistent/prepared", "--backends", "torchvision"), "prepared dataset not found", 1),
    (("data", "--manifest", "{prepared}", "--backends", "dali-gpu"), "dali-gpu needs a CUDA GPU", 2),
    (("data", "--manifest", "{prepared}", "--backends", "opencv"), "unknown backend 'opencv'", 2),
    (("data", "--manifest", "{prepared}", "--photo-size", "12"), "is not WIDTHxHEIGHT", 2),
    (("data", "--manifest", "{prepared}", "--batches", "0"), "--batches must be >= 1", 2),
])
def test_bad_requests_fail_with_one_line(args, message, exit_code, prepared_cars5, tmp_path):
    args = tuple(a.format(prepared=prepared_cars5) for a in args)
    done = bench(*args, "--out", str(tmp_path / "report.json"), timeout=120)
    assert done.returncode == exit_code
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "report.json").exists()
