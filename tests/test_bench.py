"""`carbrand bench data|train` on the real cars5 photos, tiny settings: the figures come out as
JSON, comparisons pair the right runs, and bad requests fail with one line and exit 2. A stopped
or killed bench, or a GPU-check step past its time limit, leaves no process behind."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image

from carbrand.bench.photo_set import build_photo_set, describe
from carbrand.bench.train_throughput import variants
from carbrand.data.manifest import load_prepared
from tests.helpers.paths import REPO
from tests.helpers.subprocesses import assert_ok, subprocess_environment
from tests.helpers.training_runs import CPU_RECIPE


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
    # The in-memory batch hands over a tensor it holds: a small share of the time, never most of it. Generous
    # (0.05 on a quiet machine): over 4 steps on a loaded 2-core machine one preemption inside the hand-over
    # weighs a lot; what the bound catches is the wait being charged the step's compute.
    assert rates["memory"]["data_wait_fraction"] < 0.5 and rates["bare"]["data_wait_fraction"] == 0
    pairs = {c["what"]: c["ratio"] for c in report["comparisons"]}
    assert pairs["real loader / in-memory batch"] == pytest.approx(
        rates["real"]["images_per_second"] / rates["memory"]["images_per_second"], rel=1e-2)
    assert pairs["product loop / bare loop"] == pytest.approx(
        rates["memory"]["images_per_second"] / rates["bare"]["images_per_second"], rel=1e-2)


def test_bench_train_measures_auto_as_the_precision_the_trainer_would_pick(monkeypatch):
    """On a CPU auto is fp32: `--precisions auto,no` is one variant, named no in every worker and in the report."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = argparse.Namespace(precisions="auto,no", channels_last="on", compile="off", measure="memory,bare",
                              config=str(CPU_RECIPE), overrides=[], warmup_steps=1, steps=1)
    assert [(v["precision"], v["measure"]) for v in variants(args)] == [("no", "memory"), ("no", "bare")]


@pytest.mark.parametrize("args, message, exit_code", [
    (("train", "--config", str(CPU_RECIPE), "--precisions", "fp16"), "fp16 needs a CUDA GPU", 2),
    (("train", "--config", str(CPU_RECIPE), "--channels-last", "maybe"), "--channels-last takes", 2),
    (("train", "--config", str(CPU_RECIPE), "data.colour=red"), "unknown config key 'data.colour'", 2),
    (("data", "--manifest", "/nonexistent/prepared", "--backends", "torchvision"), "prepared dataset not found", 1),
    (("data", "--manifest", "{prepared}", "--backends", "dali-gpu"), "dali-gpu needs a CUDA GPU", 2),
    (("data", "--manifest", "{prepared}", "--backends", "opencv"), "unknown backend 'opencv'", 2),
    (("data", "--manifest", "{prepared}", "--photo-size", "12"), "is not WIDTHxHEIGHT", 2),
    (("data", "--manifest", "{prepared}", "--batches", "0"), "--batches must be >= 1", 2),
    (("serve", "--checkpoint", "{prepared}", "--photos", "{prepared}", "--run", "crowd", "--connections", "20",
      "--slow-connections", "20"), "--slow-connections must be at least 0 and below --connections (20)", 2),
])
def test_bad_requests_fail_with_one_line(args, message, exit_code, prepared_cars5, tmp_path):
    args = tuple(a.format(prepared=prepared_cars5) for a in args)
    done = bench(*args, "--out", str(tmp_path / "report.json"), timeout=120)
    assert done.returncode == exit_code
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "report.json").exists()


def still_running(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:  # a zombie has ended; only its exit status is left
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def wait_for_exit(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of `processes` still running after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while still_running(processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    return still_running(processes)


def bench_workers(bench: subprocess.Popen) -> list[psutil.Process]:
    workers = []
    for child in psutil.Process(bench.pid).children():
        try:
            if "carbrand.bench.train_worker" in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.Error:
            continue
    return workers


def start_bench_train(prepared: Path, tmp_path: Path, measure: str) -> subprocess.Popen:
    """A long measurement (2,000 steps; the trainer's next log step 1,000 steps away), output to files."""
    command = [sys.executable, "-m", "carbrand.cli", "bench", "train", "--config", str(CPU_RECIPE),
               f"data.manifest={prepared}", "data.image_size=32", "data.workers=0", "--precisions", "no",
               "--measure", measure, "--warmup-steps", "1000", "--steps", "1000"]
    # TMPDIR: where the bench puts its workers' throw-away run folders
    env = subprocess_environment() | {"TMPDIR": str(tmp_path / "tmp"), "OMP_NUM_THREADS": "1"}
    (tmp_path / "tmp").mkdir()
    with (tmp_path / "stderr.txt").open("w") as stderr:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=REPO)


def wait_for_worker(bench: subprocess.Popen, tmp_path: Path, ready) -> list[psutil.Process]:
    deadline, workers = time.monotonic() + 240, []
    while not (workers and ready(workers)):
        assert bench.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "the bench's worker never got going"
        workers = workers or bench_workers(bench)
        time.sleep(0.2)
    return workers


@pytest.mark.slow
@pytest.mark.parametrize("signal_number, exit_code, measure", [
    (signal.SIGTERM, 143, "memory"),  # the trainer: takes SIGTERM as a graceful stop at its next log step
    (signal.SIGKILL, -signal.SIGKILL, "bare"),  # a silent worker: no write to its closed pipe can end it
], ids=["SIGTERM", "kill-9"])
def test_stopped_or_killed_bench_train_leaves_no_worker(signal_number, exit_code, measure, prepared_cars5, tmp_path):
    bench = start_bench_train(prepared_cars5, tmp_path, measure)
    workers = []
    try:
        if measure == "memory":  # until the trainer is in its loop
            workers = wait_for_worker(bench, tmp_path, lambda _: list(tmp_path.glob("tmp/carbrand-bench-*/metrics.jsonl")))
        else:  # until the bare loop has run a while (imports and set-up take a few CPU seconds)
            workers = wait_for_worker(bench, tmp_path, lambda found: sum(found[0].cpu_times()[:2]) > 8)
        os.kill(bench.pid, signal_number)
        code = bench.wait(timeout=60)
        left = wait_for_exit(workers, timeout=15)
    finally:
        bench.kill()
        for worker in still_running(workers):
            worker.kill()
    assert code == exit_code
    assert not left, f"worker(s) {[w.pid for w in left]} outlived the bench"
    if signal_number == signal.SIGTERM:
        assert "carbrand bench: error: stopped by SIGTERM" in (tmp_path / "stderr.txt").read_text()
        assert not list(tmp_path.glob("tmp/carbrand-bench-*")), "the worker's run folder must go with it"


def test_gpu_check_step_past_its_limit_leaves_no_process(tmp_path):
    """tests/run_gpu_checks.sh's `step`: what the step started is ended, even a process that ignores
    SIGTERM (a trainer waiting for its log step) or sits in a session of its own."""
    pids = tmp_path / "pids"
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    step_program = (f"import subprocess, sys, time; code = {stubborn!r}; "
                    "a = subprocess.Popen([sys.executable, '-c', code]); "
                    "b = subprocess.Popen([sys.executable, '-c', code], start_new_session=True); "
                    f"open({str(pids)!r}, 'w').write(f'{{a.pid}} {{b.pid}}'); time.sleep(600)")
    script = f"source tests/run_gpu_checks.sh && step 8 {sys.executable} -c {shlex.quote(step_program)}"
    started = time.monotonic()
    with (tmp_path / "output.txt").open("w") as output:  # a file: a leftover holding a pipe must not block the test
        subprocess.run(["bash", "-c", script], stdout=output, stderr=subprocess.STDOUT, cwd=REPO, timeout=120)
    assert time.monotonic() - started < 60, "the step must end at its limit"
    said = (tmp_path / "output.txt").read_text()
    assert "== exit 124" in said, said  # timeout's code: the limit was reached
    leftovers = [psutil.Process(int(pid)) for pid in pids.read_text().split() if psutil.pid_exists(int(pid))]
    try:
        left = wait_for_exit(leftovers, timeout=10)
    finally:
        for process in still_running(leftovers):
            process.kill()
    assert not left, f"the step left {[p.pid for p in left]} running"


def test_gpu_checks_go_on_after_a_failed_step_then_exit_1_naming_it(tmp_path):
    """tests/run_gpu_checks.sh: a failing step (a failed GPU test) must fail the script, not only print its code."""
    script = ("source tests/run_gpu_checks.sh && step 20 false && step 20 true && report_failed_steps; "
              "echo 'after the report'")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "== exit 1" in result.stdout and "== exit 0" in result.stdout, "the step after the failed one must run"
    assert "after the report" not in result.stdout
    assert result.stderr.splitlines() == ["tests/run_gpu_checks.sh: 1 step(s) failed:", "  false (exit 1)"], result.stderr
    passing = subprocess.run(["bash", "-c", "source tests/run_gpu_checks.sh && step 20 true && report_failed_steps"],
                             capture_output=True, text=True, cwd=REPO, timeout=60)
    assert passing.returncode == 0, passing.stderr


def test_gpu_checks_import_the_checkout_where_carbrand_is_not_installed(tmp_path):
    """A bare GPU host (carbrand not pip-installed): the trainer started as a script, as the GPU tests start it, must
    import carbrand. Here a sitecustomize takes away this machine's editable install to make such a host."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in getattr(f, '__name__', '')]\n")
    bare = dict(os.environ, PYTHONPATH=str(tmp_path))
    script = f"{sys.executable} carbrand/train.py --help"
    without = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=REPO, env=bare, timeout=120)
    assert "No module named 'carbrand'" in without.stderr, "the sitecustomize did not take the install away"
    checks = subprocess.run(["bash", "-c", f"source tests/run_gpu_checks.sh && {script}"], capture_output=True,
                            text=True, cwd=REPO, env=bare, timeout=120)
    assert checks.returncode == 0 and "--config" in checks.stdout, checks.stderr[-2000:]


def test_gpu_checks_run_only_the_named_steps_and_refuse_an_unknown_name(tmp_path):
    """A short lease names the steps it still lacks: only those run, and a misspelt name stops the script before any
    step (and before it asks for a GPU) rather than silently measuring nothing."""
    script = ("source tests/run_gpu_checks.sh && wanted_steps=(tests nchw) && "
              "for name in tests nchw bf16 epochs; do wanted $name && echo run $name || echo skip $name; done && "
              "wanted_steps=() && wanted bf16 && echo run all")
    picked = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert picked.stdout.splitlines() == ["run tests", "run nchw", "skip bf16", "skip epochs", "run all"], picked.stderr
    unknown = subprocess.run(["bash", "tests/run_gpu_checks.sh", str(tmp_path / "out"), "nchw", "epoch"],
                             capture_output=True, text=True, cwd=REPO, timeout=60)
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("tests/run_gpu_checks.sh: no step named 'epoch'"), unknown.stderr
    assert not (tmp_path / "out").exists(), "nothing may run before the names are checked"
