"""`carbrand bench accuracy`: real train + evaluate per cell, mean ± sd over seeds, a stopped sweep goes on."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO
from tests.helpers.subprocesses import assert_ok, subprocess_environment

# Two optimizer steps at 32 px: the figures are meaningless, the plumbing is what is under test.
TINY = ("data.image_size=32", "train.epochs=1", "train.max_steps=2", "data.workers=1")


def bench_accuracy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "carbrand.cli", "bench", "accuracy", *args], capture_output=True,
                          text=True, env=subprocess_environment(), cwd=REPO, timeout=600)


@pytest.mark.slow
def test_each_cell_is_trained_and_scored_on_test_and_summarised_over_seeds(prepared_cars5, tmp_path):
    work, out = tmp_path / "sweep", tmp_path / "report.json"
    arguments = ("--config", "configs/cars5_cpu.yaml", "--manifest", str(prepared_cars5), "--augment", "trivial",
                 "--mix", "on", "--seeds", "0,1", "--parallel", "2", "--work-dir", str(work), "--out", str(out), *TINY)
    assert_ok(bench_accuracy(*arguments))
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert [(r["augment"], r["mix"], r["seed"], r["reused"]) for r in runs] == [("trivial", "on", 0, False),
                                                                               ("trivial", "on", 1, False)]
    for run in runs:
        cell = work / f"trivial-mix_on-seed{run['seed']}"
        best, final = (json.loads((cell / name / "metrics.json").read_text()) for name in ("test", "test_last"))
        assert (run["accuracy"], run["macro_f1"], run["test_samples"]) == (
            best["accuracy"], best["macro_f1"], 100), "the figure is the evaluator's, on the 100 test photos"
        assert best["checkpoint"] == str(cell / "best") and final["checkpoint"] == str((cell / "last").resolve())
        assert (run["last_accuracy"], run["last_macro_f1"]) == (final["accuracy"], final["macro_f1"])
        config = (work / f"trivial-mix_on-seed{run['seed']}" / "config.yaml").read_text()
        assert f"seed: {run['seed']}" in config and "augment: trivial" in config and "cutmix_alpha: 1.0" in config
    (summary,) = report["summary"]
    assert summary["accuracy_mean"] == pytest.approx(statistics.fmean(r["accuracy"] for r in runs))
    assert summary["accuracy_sd"] == pytest.approx(statistics.stdev(r["accuracy"] for r in runs))
    assert summary["macro_f1_sd"] == pytest.approx(statistics.stdev(r["macro_f1"] for r in runs))
    assert summary["last_accuracy_mean"] == pytest.approx(statistics.fmean(r["last_accuracy"] for r in runs))

    train_log = work / "trivial-mix_on-seed0" / "train.log"
    before = train_log.stat().st_mtime_ns
    again = bench_accuracy(*arguments)
    assert_ok(again)
    assert all(r["reused"] for r in json.loads(out.read_text())["runs"]), "finished cells are read, not retrained"
    assert train_log.stat().st_mtime_ns == before and "done before" in again.stderr


def test_an_unknown_policy_is_one_line_naming_the_option(prepared_cars5, tmp_path):
    done = bench_accuracy("--config", "configs/cars5_cpu.yaml", "--manifest", str(prepared_cars5),
                          "--augment", "none,sharpen", "--work-dir", str(tmp_path))
    assert done.returncode == 2 and "--augment" in done.stderr and "'none,sharpen'" in done.stderr
    assert not any(tmp_path.iterdir()), "nothing trained before the arguments were checked"
