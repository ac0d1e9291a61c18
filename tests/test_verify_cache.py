"""A prepare killed at ~90 % keeps what it verified: the rerun reads only the files it had not finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from carbrand.prepare.command import prepare_dataset
from carbrand.prepare.verify_cache import CACHE_FILE
from tests.helpers.image_factory import write_jpeg
from tests.helpers.paths import REPO
from tests.helpers.subprocesses import subprocess_environment

BRANDS = ("alpha", "beta", "gamma")
PER_BRAND = 100
PHOTO_SIZE = (320, 240)  # large enough that 300 photos take a moment on one worker


@pytest.fixture
def source(tmp_path) -> Path:
    root = tmp_path / "photos"
    for b, brand in enumerate(BRANDS):
        for k in range(PER_BRAND):
            write_jpeg(root / brand / f"{k:03d}.jpg", b * 1000 + k, PHOTO_SIZE)
    return root


def cached_paths(cache: Path) -> set[str]:
    paths = set()
    for line in cache.read_text().splitlines():
        try:
            paths.add(json.loads(line)["key"]["path"])
        except (ValueError, KeyError):
            continue
    return paths


def kill_at(fraction: float, command: list[str], cache: Path, total: int) -> set[str]:
    """Run `command`, SIGKILL it once `fraction` of the images are in the cache; the paths cached by then."""
    process = subprocess.Popen(command, cwd=REPO, env=subprocess_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while not (cache.is_file() and len(cached_paths(cache)) >= fraction * total):
            assert process.poll() is None, f"prepare ended before it was killed: {process.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "prepare never got to 90 %"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert not leftover_processes(command[command.index("--out") + 1]), "a worker outlived the killed prepare"
    return cached_paths(cache)


def leftover_processes(marker: str, wait_s: float = 10) -> list[int]:
    """PIDs of processes whose command line names `marker` (the --out folder), after up to `wait_s` for them to go."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:  # gone meanwhile
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_a_rerun_after_a_kill_reads_only_the_unfinished_files(source, tmp_path):
    out, total = tmp_path / "prepared", len(BRANDS) * PER_BRAND
    command = [sys.executable, "-m", "carbrand.cli", "prepare", str(source), "--out", str(out), "--workers", "1", "--quiet"]
    done = kill_at(0.9, command, out / CACHE_FILE, total)
    assert not (out / "manifest.json").exists()  # really interrupted
    assert 0.9 * total <= len(done) < total
    with (out / CACHE_FILE).open("a") as cache:
        cache.write('{"version": 2, "key": {"path": "')  # a line cut short by the kill must not poison the cache

    rerun = prepare_dataset(source, out, workers=1, quiet=True)
    all_paths = {str(path) for path in source.rglob("*.jpg")}
    assert {str(path) for path in rerun.read} == all_paths - done
    assert rerun.manifest["verify_cache"] == {"read": total - len(done), "reused": len(done)}

    fresh = prepare_dataset(source, tmp_path / "fresh", workers=1, quiet=True, verify_cache=False)
    for name in ("classes.json", "train.csv", "val.csv", "test.csv"):
        assert (out / name).read_text() == (tmp_path / "fresh" / name).read_text()
    assert rerun.duplicates == fresh.duplicates and len(fresh.read) == total

    changed = source / "beta" / "007.jpg"
    write_jpeg(changed, 99_999, PHOTO_SIZE)  # new content, size and mtime
    assert prepare_dataset(source, out, workers=1, quiet=True).read == [changed]
    lines = (out / CACHE_FILE).read_text().splitlines()  # compacted: one whole line per image, the cut one gone
    assert len(lines) == total and all(json.loads(line)["key"]["path"] for line in lines)


def test_a_changed_limit_reads_every_file_again(source, tmp_path):
    out = tmp_path / "prepared"
    prepare_dataset(source, out, workers=2, quiet=True)
    assert prepare_dataset(source, out, workers=2, quiet=True).read == []
    again = prepare_dataset(source, out, workers=2, quiet=True, min_side=100)  # the verdict depends on the limits
    assert len(again.read) == len(BRANDS) * PER_BRAND
