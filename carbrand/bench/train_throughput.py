"""`carbrand bench train`: training images/s per precision, layout and compile setting.

    carbrand bench train --config configs/cars5_cpu.yaml --precisions no,bf16
    carbrand bench train --config configs/stanford_cars.yaml data.batch_size=256 --compile off,on   (GPU host)

For each variant it measures, in a fresh process each:
  real     the trainer with the config's loader (JPEG files -> DALI or torchvision)
  memory   the trainer with one in-memory batch (data.loader=memory): the input-free ceiling
  bare     a bare PyTorch loop on that same in-memory batch: the trainer's own overhead
and reports images/s, the share of step time spent waiting for data, peak memory, and
the ratios real/memory and memory/bare, each pair measured in the same run. Variants
are repeated `--repeats` times in interleaved order and the median is reported, so a
noisy neighbour slows both sides of a comparison alike.

No worker outlives the bench: each is ended (SIGTERM, then SIGKILL after GRACE_SECONDS) when its
measurement returns, fails, or the bench is stopped (SIGTERM/SIGINT: exit code 128 + the signal);
a worker also dies with the bench if the bench is killed outright (train_worker.die_with_bench).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile

import torch

from carbrand.bench.data_throughput import device_name
from carbrand.bench.train_worker import RESULT_PREFIX
from carbrand.config import PRECISIONS, load_config
from carbrand.errors import CarbrandError, UsageError
from carbrand.precision import resolve_precision

ON_OFF = {"on": True, "off": False}
GRACE_SECONDS = 5.0  # a worker asked to stop (SIGTERM) gets this long before SIGKILL: it holds the GPU
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class BenchStopped(CarbrandError):
    """The bench was asked to stop; raised in the main thread so that every worker is ended on the way out."""

    def __init__(self, number: int):
        super().__init__(f"stopped by {signal.Signals(number).name}; its worker processes were ended, no report written")
        self.exit_code = 128 + number  # 143 for SIGTERM, 130 for SIGINT, as if the signal had ended it


@contextlib.contextmanager
def stop_signals_raise():
    """SIGTERM/SIGINT raise BenchStopped once (later ones are ignored: the workers are being ended already)."""
    stopping = []

    def handle(number: int, frame) -> None:  # noqa: ARG001 - signal handler signature
        if not stopping:
            stopping.append(number)
            raise BenchStopped(number)

    previous = {number: signal.signal(number, handle) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def parse_list(text: str, allowed: tuple[str, ...], option: str) -> list[str]:
    values = [v for v in text.split(",") if v]
    for value in values:
        if value not in allowed:
            raise UsageError(f"{option} takes a comma list of {', '.join(allowed)}; got {value!r}")
    return values


def variants(args) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # auto resolved here, as the trainer would: every worker and the report name what was measured
    requested = parse_list(args.precisions, PRECISIONS, "--precisions")
    precisions = list(dict.fromkeys(resolve_precision(precision, device) for precision in requested))  # CPU: auto,no is one
    if "fp16" in precisions and device.type != "cuda":
        raise UsageError("--precisions fp16 needs a CUDA GPU (the trainer refuses fp16 on a CPU); use auto, no or bf16")
    layouts = parse_list(args.channels_last, tuple(ON_OFF), "--channels-last")
    compiles = parse_list(args.compile, tuple(ON_OFF), "--compile")
    modes = parse_list(args.measure, ("real", "memory", "bare"), "--measure")
    out = []
    for precision, layout, compile_ in itertools.product(precisions, layouts, compiles):
        for measure in modes:
            out.append({"mode": "bare" if measure == "bare" else "product", "loader": "real" if measure == "real" else "memory",
                        "measure": measure, "precision": precision, "channels_last": ON_OFF[layout],
                        "compile": ON_OFF[compile_], "config": args.config, "overrides": list(args.overrides),
                        "warmup_steps": args.warmup_steps, "steps": args.steps})
    return out


def run_worker(spec: dict) -> dict:
    """One measurement in a fresh process, on a throw-away run directory; neither outlives this call."""
    env = dict(os.environ, WANDB_MODE="disabled")
    with tempfile.TemporaryDirectory(prefix="carbrand-bench-") as run_dir:
        command = [sys.executable, "-m", "carbrand.bench.train_worker",
                   json.dumps(spec | {"run_dir": run_dir, "bench_pid": os.getpid()})]
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as worker:
            try:
                stdout, stderr = worker.communicate()
            finally:
                end_worker(worker)  # whatever ended the wait: a result, an error, a signal to the bench
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if worker.returncode != 0 or not lines:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        raise CarbrandError(f"bench train: the {spec['measure']} run ({label(spec)}) failed: {last}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def end_worker(worker: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after GRACE_SECONDS; returns once the worker is gone (a no-op if it already is)."""
    if worker.poll() is not None:
        return
    worker.terminate()
    try:
        worker.wait(timeout=GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        pass
    finally:  # also when a signal to the bench cut the wait short
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def label(spec: dict) -> str:
    return (f"{spec['precision']}, channels_last {'on' if spec['channels_last'] else 'off'}, "
            f"compile {'on' if spec['compile'] else 'off'}")


def run_train_benchmark(args) -> dict:
    config = load_config(args.config, args.overrides)  # a bad config fails here, once, before any run
    if args.steps < 1 or args.warmup_steps < 1 or args.repeats < 1:
        raise UsageError("--steps, --warmup-steps and --repeats must be >= 1")
    specs = variants(args)
    samples: dict[int, list[dict]] = {i: [] for i in range(len(specs))}
    with stop_signals_raise():
        for repeat in range(args.repeats):
            for index, spec in enumerate(specs):
                result = run_worker(spec)
                samples[index].append(result)
                print(f"carbrand bench: [{repeat + 1}/{args.repeats}] {spec['measure']:<6} {label(spec):<40} "
                      f"{result['images_per_second']:>9.1f} img/s  data wait {result['data_wait_fraction']:.1%}",
                      file=sys.stderr)
    results = []
    for index, spec in enumerate(specs):
        runs = samples[index]
        results.append({
            "measure": spec["measure"], "precision": spec["precision"], "channels_last": spec["channels_last"],
            "compile": spec["compile"],
            "images_per_second": round(statistics.median(r["images_per_second"] for r in runs), 2),
            "images_per_second_runs": [round(r["images_per_second"], 2) for r in runs],
            "data_wait_fraction": round(statistics.median(r["data_wait_fraction"] for r in runs), 4),
            "peak_gpu_memory_gb": max((r["peak_gpu_memory_gb"] or 0 for r in runs), default=0) or None,
            "peak_host_memory_gb": round(max(r["peak_host_memory_gb"] for r in runs), 3),
        })
    return {"benchmark": "train", "device": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
            "arch": config.model.arch, "batch_size": config.data.batch_size, "image_size": config.data.image_size,
            "loader": config.data.loader, "steps": args.steps, "warmup_steps": args.warmup_steps,
            "repeats": args.repeats, "results": results, "comparisons": comparisons(results)}


def comparisons(results: list[dict]) -> list[dict]:
    """real/memory (how much the input pipeline costs) and memory/bare (the trainer's overhead)."""
    keyed = {(r["precision"], r["channels_last"], r["compile"], r["measure"]): r["images_per_second"] for r in results}
    out = []
    for (precision, layout, compiled, measure), rate in keyed.items():
        pairs = {"real": ("memory", "real loader / in-memory batch"), "memory": ("bare", "product loop / bare loop")}
        if measure not in pairs or (precision, layout, compiled, pairs[measure][0]) not in keyed:
            continue
        baseline = keyed[(precision, layout, compiled, pairs[measure][0])]
        out.append({"what": pairs[measure][1], "precision": precision, "channels_last": layout, "compile": compiled,
                    "ratio": round(rate / baseline, 4)})
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="training recipe, e.g. configs/cars5_cpu.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    parser.add_argument("--precisions", default="auto",
                        help="comma list of auto, no, bf16, fp16 (default auto: bf16 on a GPU with bf16, fp16 on one "
                             "without, no on a CPU)")
    parser.add_argument("--channels-last", default="on", help="on, off or on,off (default on)")
    parser.add_argument("--compile", default="off", help="on, off or off,on (default off)")
    parser.add_argument("--measure", default="real,memory,bare",
                        help="comma list of real, memory, bare (default all three)")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run (default 30)")
    parser.add_argument("--warmup-steps", type=int, default=10, help="untimed steps first (default 10)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant, interleaved; median kept (default 1)")
