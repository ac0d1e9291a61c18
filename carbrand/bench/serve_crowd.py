"""`carbrand bench serve --run crowd`: many connections at once, some of them slow, against one `carbrand serve`.

    carbrand bench serve --run crowd --checkpoint demo/run/best --photos ../shared/data/cars5/test \
        --batching on --connections 200 --slow-connections 20 --duration-s 30

`--connections` connections are opened together and held for `--duration-s` seconds. The good
ones send photos back to back over a kept-alive connection; the slow ones (a slowloris client)
send one byte a second: half of them the request's headers, half a photo's body after complete
headers. Reported: p50/p99 latency of the good requests, how many of them failed (must be 0),
how each slow connection ended (the status the server answered, closed, or still open when the
run ended) and after how long, and the server's memory (resident set of the server process and
its workers: after warm-up, the highest seen during the run, and the kernel's high-water marks
VmHWM, which cover start-up too).
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from carbrand.bench.http_client import FilePart, ServiceClient, multipart_body
from carbrand.bench.request_outcomes import Outcome, percentile

SLOW_KINDS = ("headers", "body")  # what a slow connection sends a byte a second
SLOW_BYTE_INTERVAL_S = 1.0
MEMORY_SAMPLE_INTERVAL_S = 0.2
KILOBYTE = 1024


@dataclass
class SlowEnding:
    kind: str  # one of SLOW_KINDS
    ending: str  # "408", "503", ... (the status answered), "closed" (no answer) or "still open"
    after_s: float  # from connecting to that ending


def measure_crowd(url: str, server_pid: int, photos: list[FilePart], connections: int, slow: int, duration_s: float) -> dict:
    """Hold `connections` connections to a running service for `duration_s`, `slow` of them slow; the figures."""
    warm = ServiceClient(url)
    warm.predict([photos[0]])  # the first forward pass sets up the model's kernels
    warm.close()
    rss_after_warmup = resident_kib(server_pid)
    sampler = MemorySampler(server_pid)
    deadline = time.monotonic() + duration_s
    with sampler, ThreadPoolExecutor(max_workers=connections) as pool:
        slow_runs = [pool.submit(slow_client, url, SLOW_KINDS[n % len(SLOW_KINDS)], photos[0], deadline) for n in range(slow)]
        good_runs = [pool.submit(good_client, url, photos, n, deadline) for n in range(connections - slow)]
        outcomes = [outcome for run in good_runs for outcome in run.result()]
        endings = [run.result() for run in slow_runs]
    return crowd_figures(outcomes, endings) | {
        "connections": connections, "slow_connections": slow, "duration_s": duration_s,
        "server_rss_after_warmup_mb": round(rss_after_warmup / KILOBYTE, 1),
        "server_rss_peak_during_run_mb": round(sampler.peak_kib / KILOBYTE, 1),
        "server_vmhwm_mb": round(memory_field_kib(server_pid, "VmHWM") / KILOBYTE, 1),
    }


def good_client(url: str, photos: list[FilePart], client_number: int, deadline: float) -> list[Outcome]:
    """Photos one after the other over one kept-alive connection until the deadline."""
    client, outcomes, number = ServiceClient(url), [], 0
    try:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                status = client.predict([photos[(client_number + number) % len(photos)]]).status
            except OSError:
                client.close()
                status = 0
            outcomes.append(Outcome(True, status, time.perf_counter() - started))
            number += 1
    finally:
        client.close()
    return outcomes


def slow_client(url: str, kind: str, photo: FilePart, deadline: float) -> SlowEnding:
    """One slowloris connection: its request a byte a second (headers, or body after whole headers) until the
    server answers or closes, or the run ends."""
    address = urlsplit(url)
    body, content_type = multipart_body([photo])
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    started = time.monotonic()
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        if kind == "body":
            sock.sendall(head)
        trickle = head + body if kind == "headers" else body
        for byte_number in range(len(trickle)):
            if time.monotonic() >= deadline:
                return SlowEnding(kind, "still open", time.monotonic() - started)
            try:
                sock.sendall(trickle[byte_number:byte_number + 1])
                answer = answer_within(sock, SLOW_BYTE_INTERVAL_S)
            except OSError:  # reset by the server
                answer = b""
            if answer is not None:
                return SlowEnding(kind, status_of(answer), time.monotonic() - started)
    return SlowEnding(kind, "sent whole request", time.monotonic() - started)


def answer_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent within `seconds` (b"": it closed the connection), or None: nothing yet."""
    sock.settimeout(seconds)
    try:
        return sock.recv(4096)
    except TimeoutError:
        return None


def status_of(answer: bytes) -> str:
    """'408' from b'HTTP/1.1 408 ...'; 'closed' for a connection closed without an answer."""
    parts = answer.split(b" ", 2)
    return parts[1].decode("ascii", "replace") if answer.startswith(b"HTTP/") and len(parts) > 1 else "closed"


def crowd_figures(outcomes: list[Outcome], endings: list[SlowEnding]) -> dict:
    succeeded = sorted(1000 * o.latency_s for o in outcomes if o.status == 200)
    return {
        "good_requests": len(outcomes),
        "failed_good_requests": len(outcomes) - len(succeeded),
        "failed_good_statuses": dict(Counter(str(o.status) for o in outcomes if o.status != 200)),
        "latency_p50_ms": round(percentile(succeeded, 50), 1),
        "latency_p99_ms": round(percentile(succeeded, 99), 1),
        "slow_endings": {kind: dict(Counter(e.ending for e in endings if e.kind == kind)) for kind in SLOW_KINDS},
        "slow_ended_after_s": {kind: [round(min(times), 1), round(max(times), 1)] for kind in SLOW_KINDS
                               if (times := [e.after_s for e in endings if e.kind == kind])},
    }


def crowd_summary_line(mode: str, figures: dict) -> str:
    return (f"crowd, batching {mode}: {figures['connections']} connections ({figures['slow_connections']} slow): "
            f"p50 {figures['latency_p50_ms']} ms, p99 {figures['latency_p99_ms']} ms, "
            f"{figures['failed_good_requests']} of {figures['good_requests']} good requests failed; "
            f"slow ones: {figures['slow_endings']} after {figures['slow_ended_after_s']} s; "
            f"server RSS {figures['server_rss_after_warmup_mb']} MB after warm-up, "
            f"{figures['server_rss_peak_during_run_mb']} MB at most during the run")


def memory_field_kib(pid: int, name: str) -> int:
    """A kB figure of /proc/PID/status (VmRSS, VmHWM), summed over the process and its children (uvicorn's
    --workers run in child processes); 0 for a process already gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    own = next((int(line.split()[1]) for line in lines if line.startswith(name + ":")), 0)
    return own + sum(memory_field_kib(child, name) for child in child_pids(pid))


def child_pids(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue  # a thread that ended meanwhile
    return children


def resident_kib(pid: int) -> int:
    return memory_field_kib(pid, "VmRSS")


class MemorySampler:
    """The server's highest resident set seen while the run lasts, sampled on a thread of its own."""

    def __init__(self, pid: int):
        self.pid, self.peak_kib = pid, 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._sample, name="memory-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stopped.set()
        self.thread.join()

    def _sample(self) -> None:
        while not self.stopped.wait(MEMORY_SAMPLE_INTERVAL_S):
            self.peak_kib = max(self.peak_kib, resident_kib(self.pid))
