"""`carbrand serve` as a real subprocess on 127.0.0.1 and a free port, for the API, browser and load tests.

Its TMPDIR is an empty folder of its own, so a test can check that no upload ever reached the disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from carbrand.bench.http_client import ServiceClient
from tests.helpers.paths import REPO
from tests.helpers.ports import free_port
from tests.helpers.subprocesses import subprocess_environment

START_TIMEOUT_S = 180  # a loaded 2-core CI machine takes a while to import torch and load the model


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    tmpdir: Path  # the server's TMPDIR: must stay empty
    log: Path
    clients: list[ServiceClient] = field(default_factory=list)  # closed before the server stops, so it need not wait for them

    def client(self) -> ServiceClient:
        self.clients.append(ServiceClient(self.url))
        return self.clients[-1]

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def run_folder_with_metrics(export: Path, into: Path, metrics: dict) -> Path:
    """RUN/best (a copy of `export`) with RUN/eval_test/metrics.json beside it, as `carbrand evaluate` leaves them."""
    import shutil

    best = into / "run" / "best"
    shutil.copytree(export, best)
    (into / "run" / "eval_test").mkdir()
    (into / "run" / "eval_test" / "metrics.json").write_text(json.dumps({"checkpoint": str(best.resolve()), **metrics}))
    return best


@contextlib.contextmanager
def serving(checkpoint: Path, workdir: Path, *options: str) -> Iterator[RunningServer]:
    port = free_port()
    tmpdir, log = workdir / "server_tmp", workdir / "server.log"
    tmpdir.mkdir(parents=True)
    env = subprocess_environment() | {"TMPDIR": str(tmpdir)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "carbrand.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port), *options]
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    server = RunningServer(f"http://127.0.0.1:{port}", process, tmpdir, log)
    try:
        wait_until_healthy(server)
        yield server
    finally:
        for client in server.clients:
            client.close()
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_healthy(server: RunningServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    client = server.client()
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"carbrand serve exited with {server.process.returncode}:\n{server.output()[-3000:]}")
        try:
            if client.get("/healthz").status == 200:
                client.close()
                return
        except OSError:
            pass
        client.close()
        time.sleep(0.25)
    raise AssertionError(f"carbrand serve did not answer /healthz within {START_TIMEOUT_S} s:\n{server.output()[-3000:]}")
