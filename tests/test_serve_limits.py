"""`carbrand serve` under many clients, over real HTTP: the connection cap, the upload budget across requests, the
deadline for slow clients, and `bench serve --run crowd` in small.

One server of its own (the fitted cars5 export) with small limits, so that each is cheap to reach: 8 connections,
1 MB per upload, 2 MB of uploads in flight, and 1.5 s for a request that falls behind 32 KB/s.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from carbrand.bench.http_client import FilePart, ServiceClient, multipart_body
from carbrand.bench.serve_crowd import measure_crowd, slow_client

MAX_CONNECTIONS = 8
CLIENT_TIMEOUT_S = 1.5
KILOBYTE = 1024


@pytest.fixture(scope="module")
def limited_server(fitted_cars5_export: Path, tmp_path_factory: pytest.TempPathFactory):
    from tests.helpers.serving import serving

    with serving(fitted_cars5_export, tmp_path_factory.mktemp("limited_server"), "--max-connections", str(MAX_CONNECTIONS),
                 "--max-upload-mb", "1", "--max-uploads-in-flight-mb", "2", "--client-timeout-s", str(CLIENT_TIMEOUT_S),
                 "--min-upload-kb-per-s", "32") as server:
        yield server


@pytest.fixture(scope="module")
def photo(cars5_dir: Path) -> FilePart:
    path = min((cars5_dir / "test").glob("*/*.jpg"))
    return FilePart(path.name, path.read_bytes())


def address(server) -> tuple[str, int]:
    return "127.0.0.1", int(server.url.rsplit(":", 1)[1])


def good_request(server, photo: FilePart) -> int:
    client = ServiceClient(server.url)
    try:
        return client.predict([photo]).status
    finally:
        client.close()


def answered_once_connections_free(server, photo: FilePart, within_s: float = 5.0) -> int:
    """The status of a good request, retried while the server is still letting go of closed connections."""
    deadline = time.monotonic() + within_s
    while (status := good_request(server, photo)) == 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    return status


class HeldUpload:
    """A request that announces a `size`-byte body and sends it at 128 KB/s (well above the minimum rate, so the
    deadline never cuts it) until closed: its bytes stay in flight meanwhile."""

    def __init__(self, server, size: int):
        body, content_type = multipart_body([FilePart("held.jpg", bytes(size))])
        self.sock = socket.create_connection(address(server), timeout=10)
        self.sock.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:KILOBYTE])
        self.rest, self.stopped = body[KILOBYTE:], threading.Event()
        self.thread = threading.Thread(target=self._feed, daemon=True)
        self.thread.start()

    def _feed(self) -> None:
        for start in range(0, len(self.rest) - 1, 16 * KILOBYTE):  # the last byte never goes: the body stays open
            if self.stopped.wait(0.125):
                return
            self.sock.sendall(self.rest[start:min(start + 16 * KILOBYTE, len(self.rest) - 1)])

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.sock.close()


def test_connections_past_the_cap_get_a_fast_503_and_the_service_recovers(limited_server, photo):
    assert answered_once_connections_free(limited_server, photo) == 200
    held = [socket.create_connection(address(limited_server)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # the server has accepted them all
        client = ServiceClient(limited_server.url)
        started = time.monotonic()
        answer = client.predict([photo])
        elapsed_s = time.monotonic() - started
        client.close()
    finally:
        for sock in held:
            sock.close()
    assert answer.status == 503, answer.body
    assert answer.json()["error"]["code"] == "too_many_connections" and answer.headers["retry-after"] == "1"
    assert elapsed_s < 1.0, f"the refusal took {elapsed_s:.2f} s"
    assert answered_once_connections_free(limited_server, photo) == 200


def test_uploads_past_the_in_flight_budget_get_503_while_small_ones_pass(limited_server, photo):
    assert answered_once_connections_free(limited_server, photo) == 200
    big = FilePart("big.jpg", photo.data + bytes(900 * KILOBYTE - len(photo.data)))
    held = [HeldUpload(limited_server, 900 * KILOBYTE) for _ in range(2)]  # 1.8 MB of the 2 MB budget
    try:
        time.sleep(0.3)  # both bodies announced and reserved
        client = ServiceClient(limited_server.url)
        refused = client.predict([big])
        small = client.predict([photo])
        client.close()
    finally:
        for upload in held:
            upload.close()
    assert refused.status == 503, refused.body
    assert refused.json()["error"]["code"] == "too_many_uploads" and refused.headers["retry-after"] == "1"
    assert small.status == 200, small.body
    deadline = time.monotonic() + 5  # the held requests' disconnects give their bytes back
    while (status := good_request(limited_server, big)) == 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status == 200


def test_a_client_sending_a_byte_a_second_is_cut_off_while_good_requests_are_answered(limited_server, photo):
    give_up = time.monotonic() + 6 * CLIENT_TIMEOUT_S
    endings = {}
    slow = [threading.Thread(target=lambda kind=kind: endings.__setitem__(kind, slow_client(limited_server.url, kind, photo,
                                                                                               give_up)))
            for kind in ("headers", "body")]
    for thread in slow:
        thread.start()
    statuses = []
    while any(thread.is_alive() for thread in slow) and time.monotonic() < give_up:
        statuses.append(good_request(limited_server, photo))
        time.sleep(0.2)
    for thread in slow:
        thread.join()
    assert statuses and set(statuses) == {200}, statuses
    for kind, ending in endings.items():
        assert ending.ending == "408", (kind, ending)
        assert CLIENT_TIMEOUT_S - 0.1 <= ending.after_s < 3 * CLIENT_TIMEOUT_S, (kind, ending)


def test_bench_serve_crowd_in_small(limited_server, photo, cars5_dir):
    from carbrand.bench.serve_load import photo_bytes

    assert answered_once_connections_free(limited_server, photo) == 200  # the slots of earlier tests are free
    figures = measure_crowd(limited_server.url, limited_server.process.pid, photo_bytes(cars5_dir / "test"), connections=5,
                            slow=2, duration_s=2 * CLIENT_TIMEOUT_S)
    assert figures["good_requests"] > 0 and figures["failed_good_requests"] == 0, figures
    assert figures["slow_endings"] == {"headers": {"408": 1}, "body": {"408": 1}}, figures
    assert figures["latency_p50_ms"] <= figures["latency_p99_ms"]
    assert 0 < figures["server_rss_after_warmup_mb"] <= figures["server_rss_peak_during_run_mb"] <= figures["server_vmhwm_mb"]


def test_the_protocol_a_worker_unpickles_imports_no_torch():
    """uvicorn's worker processes unpickle their config, this protocol and its limits included, before they answer the
    supervisor's health check; importing torch there took longer than its 5 s and the workers were killed in a loop."""
    import subprocess
    import sys

    from tests.helpers.paths import REPO
    from tests.helpers.subprocesses import subprocess_environment

    check = "import sys, carbrand.serve.connections; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=subprocess_environment(),
                            cwd=REPO, check=True)
    assert result.stdout.strip() == "False", result.stdout + result.stderr
