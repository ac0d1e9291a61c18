"""One `carbrand bench train` measurement, in a process of its own.

    python -m carbrand.bench.train_worker '{"mode": "product", "loader": "memory", "run_dir": ..., "bench_pid": ...}'

Modes: `product` runs carbrand's own trainer (`carbrand.train.train`) and reads the
images/s it logged; `bare` runs the few lines any PyTorch user would write for the same
model, batch, precision and layout, on the same in-memory batch. A fresh process per
measurement: Accelerate's state, compile caches, cudnn autotuning and the peak-memory
counters start clean, so no variant pays for, or profits from, another.
The result is the last stdout line, prefixed with RESULT_PREFIX. The bench owns the run
directory and ends the worker when it is done with it; the worker also dies with the bench
(`die_with_bench`), so not even `kill -9` of the bench leaves it training, holding the GPU.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from carbrand.bench.timing import now
from carbrand.config import Config, load_config
from carbrand.data.manifest import load_prepared
from carbrand.data.memory_loader import random_batch
from carbrand.model import build_model
from carbrand.precision import autocast, input_dtype
from carbrand.training.optimization import build_optimizer, peak_learning_rate

RESULT_PREFIX = "CARBRAND_BENCH_RESULT "


def variant_overrides(spec: dict) -> list[str]:
    """What every measurement of this variant fixes, product and bare alike."""
    return [*spec["overrides"], f"train.precision={spec['precision']}", f"train.channels_last={spec['channels_last']}",
            f"model.compile={spec['compile']}", "model.pretrained=none", "model.freeze_backbone_epochs=0",
            "train.grad_accum_steps=1"]


def product(spec: dict) -> dict:
    """The trainer as users run it, on a throw-away run directory; images/s from its own log."""
    from carbrand.train import train  # the trainer loads in the measuring process only, not in every bench

    warmup, steps, run_dir = spec["warmup_steps"], spec["steps"], spec["run_dir"]
    window = math.gcd(warmup, steps)  # log windows must tile warm-up and measured steps exactly
    overrides = variant_overrides(spec) + [
        f"output.dir={run_dir}", "wandb.mode=disabled", "train.resume=never", "train.epochs=1000000",
        f"train.max_steps={warmup + steps}", f"train.log_every={window}",
        f"train.eval_every_steps={warmup + steps}", "train.checkpoint_every_steps=0", "train.keep_checkpoints=1"]
    if spec["loader"] == "memory":
        overrides.append("data.loader=memory")
    config = load_config(spec["config"], overrides)
    exit_code = train(config)
    if exit_code != 0:
        raise SystemExit(f"the trainer exited with {exit_code}")
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "train/images_per_second" in r and r["step"] > warmup]
    # equal windows: the rate over all of them is the harmonic mean of the window rates
    images_per_second = len(windows) / sum(1.0 / r["train/images_per_second"] for r in windows)
    memory = [r["train/gpu_memory_gb"] for r in windows if "train/gpu_memory_gb" in r]
    return {"images_per_second": images_per_second,
            "data_wait_fraction": sum(r["train/data_wait_fraction"] for r in windows) / len(windows),
            "peak_gpu_memory_gb": max(memory) if memory else None}


def bare(spec: dict) -> dict:
    """forward, loss, backward, step, zero_grad on one in-memory batch; nothing else."""
    config: Config = load_config(spec["config"], variant_overrides(spec))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t, data = config.train, config.data
    if device.type == "cuda":  # the same backend switches the trainer sets
        torch.backends.cudnn.benchmark = t.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = t.tf32
        torch.backends.cudnn.allow_tf32 = t.tf32
    torch.manual_seed(t.seed)
    num_classes = len(load_prepared(data.manifest).classes)
    model = build_model(config.model.arch, num_classes, "none")
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    optimizer = build_optimizer(model, config.optim, peak_learning_rate(config.optim, data.batch_size), device)
    if config.model.compile:
        model = torch.compile(model)
    images = random_batch(data.batch_size, data.image_size, seed=t.seed, device=device, dtype=input_dtype(t.precision),
                          channels_last=t.channels_last)
    labels = torch.randint(0, num_classes, (data.batch_size,), device=device)
    scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None

    def step() -> None:
        with autocast(device, t.precision):
            loss = F.cross_entropy(model(images), labels, label_smoothing=t.label_smoothing)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(spec["warmup_steps"]):
        step()
    start = now(device)
    for _ in range(spec["steps"]):
        step()
    seconds = now(device) - start
    return {"images_per_second": spec["steps"] * data.batch_size / seconds, "data_wait_fraction": 0.0,
            "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def die_with_bench(bench_pid: int) -> None:
    """SIGKILL this worker as soon as the bench that started it dies, however it dies (kill -9 included).

    Linux: the kernel does it (prctl PR_SET_PDEATHSIG). SIGKILL, not SIGTERM: the trainer takes
    SIGTERM as a graceful stop at its next log step, and nobody is left to read the result.
    Elsewhere: a thread that watches the parent process id.
    """
    if sys.platform == "linux":
        PR_SET_PDEATHSIG = 1  # noqa: N806 - the kernel's name
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    else:
        def watch() -> None:
            while os.getppid() == bench_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="die-with-bench", daemon=True).start()
    if os.getppid() != bench_pid:  # the bench died before the line above: nothing would send the signal
        os._exit(1)


def main() -> int:
    spec = json.loads(sys.argv[1])
    die_with_bench(spec["bench_pid"])
    result = (product if spec["mode"] == "product" else bare)(spec)
    result["peak_host_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
