"""What `carbrand serve` hands to each server process: one typed, JSON-serialisable settings object.

uvicorn starts every worker process fresh from an import string, so the settings travel in
the environment (SETTINGS_VARIABLE) and each worker builds its own app and loads the model once.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from carbrand.serve.batching import BatchingSettings

SETTINGS_VARIABLE = "CARBRAND_SERVE_SETTINGS"
MEGABYTE = 1024 * 1024
KILOBYTE = 1024
RETRY_AFTER_S = 1  # what every 503 (busy, too many connections or uploads) tells the client to wait before retrying


@dataclass(frozen=True)
class ConnectionLimits:
    """Per server process, enforced by its HTTP protocol (carbrand/serve/connections.py)."""

    max_connections: int = 512  # open connections; one more gets 503 at once (well under the usual 1024 open files)
    # A request (headers and body) has this long to arrive, each byte adding 1/min_upload_bytes_per_s s, never to more
    # than this far ahead: 256 kbit/s always arrives, a byte a second or a stall this long gets 408 and is closed.
    client_timeout_s: float = 10.0
    min_upload_bytes_per_s: int = 32 * KILOBYTE


@dataclass(frozen=True)
class ServeSettings:
    checkpoint: str  # an export directory (RUN/best)
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    max_upload_bytes: int = 20 * MEGABYTE  # the whole request body; larger is refused with 413 while it streams in
    max_images: int = 16  # files per request
    # Request bodies held at once by one process (uploads received, not yet answered); past it, 503 with Retry-After.
    max_uploads_in_flight_bytes: int = 256 * MEGABYTE
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    topk: int = 5  # brands per image unless the request asks (?topk=K)
    device: str | None = None  # torch device; None: cuda if available, else cpu
    crops: int | None = None  # eval crops per photo (--crops); None: the export's data.eval_crops

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeSettings:
        raw = json.loads(text)
        return cls(**{**raw, "batching": BatchingSettings(**raw["batching"]), "connections": ConnectionLimits(**raw["connections"])})


def settings_from_environment() -> ServeSettings:
    text = os.environ.get(SETTINGS_VARIABLE)
    if not text:
        raise RuntimeError(f"{SETTINGS_VARIABLE} is not set: start the service with `carbrand serve`")
    return ServeSettings.from_json(text)
