"""`carbrand serve` as a real subprocess on 127.0.0.1 and a free port, for the API, browser and load tests.

Its TMPDIR is an empty folder of its own, so a test can check that no upload ever reached the disk.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from carbrand.bench.service_process import ServiceProcess, running_service
from tests.helpers.subprocesses import subprocess_environment


@dataclass
class RunningServer:
    service: ServiceProcess
    tmpdir: Path  # the server's TMPDIR: must stay empty

    @property
    def url(self) -> str:
        return self.service.url

    @property
    def process(self):
        return self.service.process

    def client(self):
        return self.service.client()

    def bytes_written(self) -> int:
        """Bytes the server process has passed to write()/send() so far: disk files, logs and sockets together."""
        io_counters = Path(f"/proc/{self.process.pid}/io").read_text()
        return int(next(line.split()[1] for line in io_counters.splitlines() if line.startswith("wchar:")))


def run_folder_with_metrics(export: Path, into: Path, metrics: dict) -> Path:
    """RUN/best (a copy of `export`) with RUN/eval_test/metrics.json beside it, as `carbrand evaluate` leaves them."""
    best = into / "run" / "best"
    shutil.copytree(export, best)
    (into / "run" / "eval_test").mkdir()
    (into / "run" / "eval_test" / "metrics.json").write_text(json.dumps({"checkpoint": str(best.resolve()), **metrics}))
    return best


@contextlib.contextmanager
def serving(checkpoint: Path, workdir: Path, *options: str) -> Iterator[RunningServer]:
    tmpdir = workdir / "server_tmp"
    tmpdir.mkdir(parents=True)
    environment = subprocess_environment() | {"TMPDIR": str(tmpdir)}
    with running_service(checkpoint, workdir / "server.log", list(options), environment, cwd=workdir) as service:
        yield RunningServer(service, tmpdir)
