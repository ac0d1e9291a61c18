"""`carbrand bench serve`: latency and images/s of `carbrand serve` under concurrent clients, batching on and off.

    carbrand bench serve --checkpoint demo/run/best --photos ../shared/data/cars5/test
    carbrand bench serve --checkpoint runs/cars/best --photos photos/ --clients 8 --requests 200 --batching on,off
    carbrand bench serve --run crowd --checkpoint demo/run/best --photos ../shared/data/cars5/test --batching on

For each batching mode a fresh `carbrand serve` is started on 127.0.0.1 (a free port; the load
never leaves this machine), warmed up, then `--clients` threads each send `--requests` requests
one after the other over a kept-alive connection. Every `--bad-every`-th request is a bad upload
(not an image, truncated JPEG, empty file, decompression-bomb header, wrong part type, missing
field, in turn) that must get its 4xx. Reported per mode: p50/p99 latency of the good requests,
good images per second over the whole run, failed good requests (must be 0), bad requests not
answered with a 4xx (must be 0), and the mean images per forward pass. `--run crowd` holds many
connections at once instead, some of them slow (carbrand/bench/serve_crowd.py).
"""

from __future__ import annotations

import argparse
import io
import statistics
import struct
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from carbrand.bench.http_client import FilePart, ServiceClient
from carbrand.bench.request_outcomes import Outcome, percentile
from carbrand.bench.serve_crowd import crowd_summary_line, measure_crowd
from carbrand.bench.service_process import running_service
from carbrand.errors import UsageError
from carbrand.prepare.formats import IMAGE_EXTENSIONS

WARMUP_REQUESTS = 8
BAD_KINDS = ("not_an_image", "truncated", "empty", "bomb", "wrong_type", "missing_field")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="an export directory (RUN/best)")
    parser.add_argument("--photos", type=Path, required=True, help="folder of photos to send (scanned recursively)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--requests", type=int, default=200, help="requests per client (default: 200)")
    parser.add_argument("--bad-every", type=int, default=10, help="every N-th request is a bad upload; 0: none (default: 10)")
    parser.add_argument("--batching", default="on,off", help="comma-separated modes to measure (default: on,off)")
    parser.add_argument("--run", choices=("load", "crowd"), default="load",
                        help="load: --clients back-to-back clients with bad uploads mixed in; crowd: --connections held at once, "
                             "--slow-connections of them sending a byte a second (default: load)")
    parser.add_argument("--connections", type=int, default=200, help="--run crowd: connections held at once (default: 200)")
    parser.add_argument("--slow-connections", type=int, default=20,
                        help="--run crowd: how many of them send a byte a second (default: 20)")
    parser.add_argument("--duration-s", type=float, default=30.0, help="--run crowd: how long they are held (default: 30)")
    parser.add_argument("--serve-option", action="append", default=[], metavar="OPTION",
                        help="extra `carbrand serve` option, e.g. --serve-option=--max-wait-ms=10 (repeatable)")


def run_serve_benchmark(args: argparse.Namespace) -> dict:
    modes = [mode.strip() for mode in args.batching.split(",") if mode.strip()]
    if not modes or any(mode not in ("on", "off") for mode in modes):
        raise UsageError(f"--batching takes on, off or on,off; got {args.batching!r}")
    check_counts(args)
    photos = photo_bytes(args.photos)
    report = {"checkpoint": str(args.checkpoint.resolve()), "run": args.run, "photos": len(photos), "modes": {}}
    if args.run == "load":
        report |= {"clients": args.clients, "requests_per_client": args.requests, "bad_every": args.bad_every}
    with tempfile.TemporaryDirectory(prefix="carbrand-bench-serve-") as scratch:
        for mode in modes:
            options = ["--batching", mode, *args.serve_option]
            with running_service(args.checkpoint, Path(scratch) / f"serve_{mode}.log", options) as service:
                if args.run == "crowd":
                    report["modes"][mode] = measure_crowd(service.url, service.process.pid, photos, args.connections,
                                                          args.slow_connections, args.duration_s)
                else:
                    report["modes"][mode] = measure(service.url, photos, args.clients, args.requests, args.bad_every)
            line = crowd_summary_line if args.run == "crowd" else summary_line
            print(line(mode, report["modes"][mode]), file=sys.stderr, flush=True)
    return report


def check_counts(args: argparse.Namespace) -> None:
    for flag, value in (("--clients", args.clients), ("--requests", args.requests), ("--connections", args.connections),
                        ("--duration-s", args.duration_s)):
        if value <= 0:
            raise UsageError(f"{flag} must be positive; got {value:g}")
    if not 0 <= args.slow_connections < args.connections:
        raise UsageError(f"--slow-connections must be at least 0 and below --connections ({args.connections}); "
                         f"got {args.slow_connections}")


def measure(url: str, photos: list[FilePart], clients: int, requests: int, bad_every: int) -> dict:
    """Load one running service; the figures of its good and bad requests."""
    warm = ServiceClient(url)
    for number in range(WARMUP_REQUESTS):
        warm.predict([photos[number % len(photos)]])
    warm.close()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        per_client = list(pool.map(lambda client: one_client(url, photos, client, requests, bad_every), range(clients)))
    wall_s = time.perf_counter() - started
    outcomes = [outcome for results in per_client for outcome in results]
    return figures(outcomes, wall_s)


def one_client(url: str, photos: list[FilePart], client_number: int, requests: int, bad_every: int) -> list[Outcome]:
    client, outcomes = ServiceClient(url), []
    try:
        for number in range(requests):
            bad = bad_every > 0 and (number + 1) % bad_every == 0
            parts = [bad_upload(BAD_KINDS[(client_number + number // bad_every) % len(BAD_KINDS)], photos[0])] if bad \
                else [photos[(client_number * requests + number) % len(photos)]]
            started = time.perf_counter()
            try:
                answer = client.predict(parts)
                status = answer.status
                batch_images = answer.json().get("inference_batch_images", 0) if status == 200 else 0
            except OSError:
                client.close()
                status, batch_images = 0, 0
            outcomes.append(Outcome(not bad, status, time.perf_counter() - started, batch_images))
    finally:
        client.close()
    return outcomes


def figures(outcomes: list[Outcome], wall_s: float) -> dict:
    good = [o for o in outcomes if o.good]
    succeeded = [o for o in good if o.status == 200]
    bad = [o for o in outcomes if not o.good]
    latencies_ms = sorted(1000 * o.latency_s for o in succeeded)
    return {
        "good_requests": len(good),
        "failed_good_requests": len(good) - len(succeeded),
        "bad_requests": len(bad),
        "bad_requests_without_4xx": sum(1 for o in bad if not 400 <= o.status < 500),
        "latency_p50_ms": round(percentile(latencies_ms, 50), 1),
        "latency_p99_ms": round(percentile(latencies_ms, 99), 1),
        "images_per_second": round(len(succeeded) / wall_s, 1),
        "mean_images_per_forward_pass": round(statistics.fmean(o.batch_images for o in succeeded), 2) if succeeded else 0.0,
        "wall_s": round(wall_s, 1),
    }


def summary_line(mode: str, figures: dict) -> str:
    return (f"batching {mode}: p50 {figures['latency_p50_ms']} ms, p99 {figures['latency_p99_ms']} ms, "
            f"{figures['images_per_second']} images/s, {figures['mean_images_per_forward_pass']} images/pass, "
            f"{figures['failed_good_requests']} of {figures['good_requests']} good requests failed, "
            f"{figures['bad_requests_without_4xx']} of {figures['bad_requests']} bad ones without a 4xx")


def photo_bytes(folder: Path) -> list[FilePart]:
    if not folder.is_dir():
        raise UsageError(f"--photos {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UsageError(f"--photos {folder}: no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return [FilePart(path.name, path.read_bytes()) for path in files]


def bad_upload(kind: str, photo: FilePart) -> FilePart:
    """One bad upload of `kind`, made in memory."""
    if kind == "not_an_image":
        return FilePart("notes.jpg", b"not a picture\n")
    if kind == "truncated":
        return FilePart("cut.jpg", photo.data[: len(photo.data) // 2])
    if kind == "empty":
        return FilePart("empty.jpg", b"")
    if kind == "bomb":
        return FilePart("bomb.png", huge_header_png(), content_type="image/png")
    if kind == "wrong_type":
        return FilePart(photo.filename, photo.data, content_type="text/plain")
    assert kind == "missing_field", kind
    return FilePart(photo.filename, photo.data, field="photo")


def huge_header_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid PNG header claiming 400 MP over a few bytes: a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    buffer = io.BytesIO()
    buffer.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)))
    buffer.write(chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))
    return buffer.getvalue()
