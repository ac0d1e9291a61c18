"""Run monitoring: `metrics.jsonl` in the run directory always, Weights & Biases when asked.

Only the main process makes a `Tracker` that writes; other ranks get one that does nothing,
so callers never check ranks. W&B is optional at every level: not installed, disabled,
or unreachable in online mode, training goes on and the local log stays complete
(one warning, never a crash). The usual WANDB_* variables win over the config
(WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME, WANDB_DIR, WANDB_BASE_URL, WANDB_API_KEY).
A server that goes away mid-run is seen at the end: `finish` waits CARBRAND_WANDB_FINISH_TIMEOUT
seconds (120) for the upload, then warns once and leaves the data on disk for `wandb sync`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from carbrand.config import Config
from carbrand.errors import first_line

RUN_ID_FILE = "wandb_run_id"


class Tracker:
    def __init__(self, run_dir: Path, config: Config, *, is_main: bool, job_type: str = "train",
                 metrics_file: str = "metrics.jsonl"):
        self.is_main = is_main
        self.metrics_path = run_dir / metrics_file
        self.run = None
        self._warned = False
        self.finish_timeout_s = float(os.environ.get("CARBRAND_WANDB_FINISH_TIMEOUT", "120"))
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.run = self._start_wandb(run_dir, config, job_type)

    def _start_wandb(self, run_dir: Path, config: Config, job_type: str):
        mode = os.environ.get("WANDB_MODE", config.wandb.mode)
        if mode == "disabled":
            return None
        try:
            import wandb
        except ImportError:
            self._warn("wandb is not installed (pip install 'carbrand[wandb]'); logging to metrics.jsonl only")
            return None
        # One W&B run per run directory: a resumed or requeued job continues the same curve.
        id_path = run_dir / RUN_ID_FILE
        run_id = id_path.read_text().strip() if id_path.is_file() else uuid.uuid4().hex[:8]
        try:
            run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", config.wandb.project),
                entity=os.environ.get("WANDB_ENTITY", config.wandb.entity),
                name=os.environ.get("WANDB_NAME", config.wandb.name or run_dir.resolve().name),
                tags=config.wandb.tags or None,
                dir=os.environ.get("WANDB_DIR", str(run_dir)),
                mode=mode,
                job_type=job_type,
                id=run_id if job_type == "train" else None,
                resume="allow" if job_type == "train" else None,
                config=config.to_dict(),
                settings=wandb.Settings(init_timeout=float(os.environ.get("CARBRAND_WANDB_INIT_TIMEOUT", "60")),
                                        # a server gone mid-run: finish() gives up after this instead of retrying for
                                        # hours at the end of the job, and raises, so that we can say so once
                                        finish_timeout=self.finish_timeout_s, finish_timeout_raises=True,
                                        console="off", silent=True),
            )
        except Exception as error:  # no network, bad key, server down: the run must not die for it
            self._warn(f"W&B could not start in {mode} mode ({type(error).__name__}: {first_line(error)}); "
                       f"logging to {self.metrics_path} only")
            return None
        if job_type == "train":
            id_path.write_text(run_id + "\n")
        return run

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.is_main:
            return
        record = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        self._wandb_call(lambda run: run.log(metrics, step=step))

    def log_image(self, key: str, path: Path, caption: str | None = None) -> None:
        if self.run is not None:
            import wandb

            self._wandb_call(lambda run: run.log({key: wandb.Image(str(path), caption=caption)}))

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            import wandb

            self._wandb_call(lambda run: run.log({key: wandb.Table(columns=columns, data=rows)}))

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self._wandb_call(lambda run: run.summary.update({k: _plain(v) for k, v in values.items()}))

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run.finish(exit_code=exit_code)
        except TimeoutError:  # the server went away mid-run (network down, server gone): log() never raises for it
            self._warn(f"W&B did not take this run's data within {self.finish_timeout_s:.0f} s at the end (server "
                       f"unreachable?); it stays on disk for `wandb sync {_sync_dir(run)}`; {self.metrics_path} is complete")
        except Exception as error:
            self._warn(f"W&B logging failed ({type(error).__name__}: {first_line(error)}); continuing with metrics.jsonl only")

    def _wandb_call(self, call) -> None:
        if self.run is None:
            return
        try:
            call(self.run)
        except Exception as error:
            self._warn(f"W&B logging failed ({type(error).__name__}: {first_line(error)}); continuing with metrics.jsonl only")
            self.run = None

    def _warn(self, message: str) -> None:
        if not self._warned:  # one warning per run, not one per step
            print(f"carbrand: warning: {message}", file=sys.stderr, flush=True)
            self._warned = True


def _sync_dir(run) -> str:
    try:
        return str(run.settings.sync_dir)
    except Exception:  # an older or newer wandb without it: the run's own folder
        return str(getattr(run, "dir", "WANDB_DIR"))


def _plain(value: Any) -> Any:
    """JSON-safe scalars: tensors and numpy numbers become Python numbers, NaN stays visible as null."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
