"""`carbrand serve` as a child process on 127.0.0.1 and a free port: started, awaited until healthy, stopped.

Used by `carbrand bench serve` and by the tests (tests/helpers/serving.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from carbrand.bench.http_client import ServiceClient
from carbrand.errors import CarbrandError

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180.0  # importing torch and loading the model on a loaded 2-core machine


@dataclass
class ServiceProcess:
    url: str
    process: subprocess.Popen
    log: Path
    clients: list[ServiceClient] = field(default_factory=list)  # closed before the server stops, so it need not wait for them

    def client(self) -> ServiceClient:
        self.clients.append(ServiceClient(self.url))
        return self.clients[-1]

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def free_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_service(checkpoint: Path, log: Path, options: list[str], environment: dict[str, str] | None = None,
                    cwd: Path | None = None) -> Iterator[ServiceProcess]:
    port = free_local_port()
    env = dict(os.environ) | (environment or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "carbrand.cli", "serve", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
               "--port", str(port), *options]
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    service = ServiceProcess(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_until_healthy(service)
        yield service
    finally:
        for client in service.clients:
            client.close()
        process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_healthy(service: ServiceProcess, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    client = ServiceClient(service.url)
    try:
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise CarbrandError(f"carbrand serve exited with {service.process.returncode}: {service.output()[-3000:]}")
            with contextlib.suppress(OSError):
                if client.get("/healthz").status == 200:
                    return
            client.close()
            time.sleep(0.25)
    finally:
        client.close()
    raise CarbrandError(f"carbrand serve did not answer /healthz within {timeout_s:g} s: {service.output()[-3000:]}")
