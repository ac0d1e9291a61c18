"""Serve a trained classifier over HTTP, with a web page to try it: FastAPI on uvicorn.

    carbrand serve --checkpoint demo/run/best                           # then open http://127.0.0.1:8000/
    carbrand serve --checkpoint runs/cars/best --host 0.0.0.0 --port 8080 --workers 2
    curl -F images=@photo.jpg -F images=@other.jpg 'http://127.0.0.1:8000/v1/predict?topk=3'

Concurrent requests are batched into shared forward passes (--batching, --max-batch,
--max-wait-ms); a full queue answers 503 and a request unanswered after --timeout-s 504.
Each of --workers processes loads the model once. Uploads are held in memory only, up to
--max-upload-mb per request and --max-uploads-in-flight-mb across requests; each process keeps
at most --max-connections open, and a request that falls --client-timeout-s behind
--min-upload-kb-per-s (a byte a second, or a stalled upload) is cut off with 408.
docs/SERVING.md has the API, the error codes and load figures.
"""

from __future__ import annotations

import argparse
import functools
import os

from carbrand.checkpoint import load_export
from carbrand.errors import UsageError
from carbrand.inference.classifier import add_crops_argument, check_crops
from carbrand.serve.batching import BatchingSettings
from carbrand.serve.settings import KILOBYTE, MEGABYTE, SETTINGS_VARIABLE, ConnectionLimits, ServeSettings

APP_FACTORY = "carbrand.serve.app:app_from_environment"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults, batching, connections = ServeSettings(checkpoint=""), BatchingSettings(), ConnectionLimits()
    parser.add_argument("--checkpoint", required=True, help="an export directory (RUN/best)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument("--workers", type=int, default=1, help="server processes, each with its own model (default: 1)")
    parser.add_argument("--batching", choices=("on", "off"), default="on",
                        help="batch concurrent requests into one forward pass (default: on)")
    parser.add_argument("--max-batch", type=int, default=batching.max_batch_images,
                        help=f"images per forward pass (default: {batching.max_batch_images})")
    parser.add_argument("--max-wait-ms", type=float, default=batching.max_wait_s * 1000,
                        help=f"how long a request waits for others to share its pass (default: {batching.max_wait_s * 1000:g})")
    parser.add_argument("--queue-size", type=int, default=batching.queue_size,
                        help=f"requests waiting for inference before new ones get 503 (default: {batching.queue_size})")
    parser.add_argument("--timeout-s", type=float, default=batching.timeout_s,
                        help=f"per-request limit from queueing to answer, else 504 (default: {batching.timeout_s:g})")
    parser.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_bytes / MEGABYTE,
                        help=f"largest request body in MB, else 413 (default: {defaults.max_upload_bytes / MEGABYTE:g})")
    parser.add_argument("--max-images", type=int, default=defaults.max_images,
                        help=f"files per request (default: {defaults.max_images})")
    parser.add_argument("--max-uploads-in-flight-mb", type=float, default=defaults.max_uploads_in_flight_bytes / MEGABYTE,
                        help="request bodies held at once by one worker, in MB; past it 503 with Retry-After "
                             f"(default: {defaults.max_uploads_in_flight_bytes / MEGABYTE:g})")
    parser.add_argument("--max-connections", type=int, default=connections.max_connections,
                        help=f"open connections per worker; one more gets 503 at once (default: {connections.max_connections})")
    parser.add_argument("--client-timeout-s", type=float, default=connections.client_timeout_s,
                        help="a request that falls this many seconds behind --min-upload-kb-per-s (headers and body) "
                             f"gets 408 and is closed (default: {connections.client_timeout_s:g})")
    parser.add_argument("--min-upload-kb-per-s", type=float, default=connections.min_upload_bytes_per_s / KILOBYTE,
                        help="upload rate that always arrives in time; 0: the whole request within --client-timeout-s "
                             f"(default: {connections.min_upload_bytes_per_s / KILOBYTE:g})")
    parser.add_argument("--topk", type=int, default=defaults.topk, help=f"brands per image unless ?topk=K (default: {defaults.topk})")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--access-log", action="store_true", help="log every request (default: start-up and errors only)")
    add_crops_argument(parser)


def settings_from_arguments(args: argparse.Namespace) -> ServeSettings:
    positive = {"--port": args.port, "--workers": args.workers, "--max-batch": args.max_batch, "--queue-size": args.queue_size,
                "--timeout-s": args.timeout_s, "--max-upload-mb": args.max_upload_mb, "--max-images": args.max_images,
                "--topk": args.topk, "--max-uploads-in-flight-mb": args.max_uploads_in_flight_mb,
                "--max-connections": args.max_connections, "--client-timeout-s": args.client_timeout_s}
    for flag, value in positive.items():
        if value <= 0:
            raise UsageError(f"{flag} must be positive; got {value:g}")
    for flag, value in {"--max-wait-ms": args.max_wait_ms, "--min-upload-kb-per-s": args.min_upload_kb_per_s}.items():
        if value < 0:
            raise UsageError(f"{flag} must be >= 0; got {value:g}")
    if args.max_uploads_in_flight_mb < args.max_upload_mb:
        raise UsageError(f"--max-uploads-in-flight-mb ({args.max_uploads_in_flight_mb:g}) must be at least --max-upload-mb "
                         f"({args.max_upload_mb:g}): a largest upload would never be accepted")
    if args.crops is not None:
        check_crops(args.crops)
    if args.port > 65535:
        raise UsageError(f"--port must be at most 65535; got {args.port}")
    batching = BatchingSettings(enabled=args.batching == "on", max_batch_images=args.max_batch,
                                max_wait_s=args.max_wait_ms / 1000, queue_size=args.queue_size, timeout_s=args.timeout_s)
    connections = ConnectionLimits(max_connections=args.max_connections, client_timeout_s=args.client_timeout_s,
                                   min_upload_bytes_per_s=int(args.min_upload_kb_per_s * KILOBYTE))
    return ServeSettings(checkpoint=os.path.abspath(args.checkpoint), batching=batching,
                         max_upload_bytes=int(args.max_upload_mb * MEGABYTE), max_images=args.max_images,
                         max_uploads_in_flight_bytes=int(args.max_uploads_in_flight_mb * MEGABYTE), connections=connections,
                         topk=args.topk, device=args.device, crops=args.crops)


def run(args: argparse.Namespace) -> int:
    import uvicorn  # the serve extra: imported only when serving

    from carbrand.serve.connections import LimitedH11Protocol

    settings = settings_from_arguments(args)
    load_export(settings.checkpoint)  # a missing or foreign checkpoint: one line here, not a traceback per worker
    os.environ[SETTINGS_VARIABLE] = settings.to_json()  # read by every worker process (uvicorn starts them fresh)
    print(f"carbrand serve: {settings.checkpoint} on http://{args.host}:{args.port}/ "
          f"({args.workers} worker(s), batching {args.batching}); open that address in a browser", flush=True)
    # The protocol goes to each worker as a picklable partial: uvicorn spawns worker processes from its config.
    protocol = functools.partial(LimitedH11Protocol, limits=settings.connections)
    uvicorn.run(APP_FACTORY, factory=True, host=args.host, port=args.port, workers=args.workers, http=protocol,
                access_log=args.access_log, log_level="info", timeout_graceful_shutdown=5)
    return 0
