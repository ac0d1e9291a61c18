"""`carbrand bench accuracy`: test accuracy and macro-F1, mean ± sd over seeds, per augmentation.

    carbrand bench accuracy --config configs/cars5_cpu.yaml --manifest data/cars5/prepared \\
        --augment none,trivial,randaugment --mix off,on --seeds 0,1,2 --work-dir runs/sweep-cars5

Every cell (augment policy x mixing x seed) is one real `carbrand train` from scratch, then
`carbrand evaluate` on the test split of its best/ (the model the run exports, chosen on val)
and of its final weights (its `last` checkpoint), each in a fresh process. A cell whose
evaluation is already in the work directory is read, not rerun, so a stopped sweep goes on
where it stopped. `--parallel P` runs P cells at once, each with cores / P intra-op threads (on
the 2-core machine two cells at once trained about as many images/s in all as one on both
cores); the figures do not depend on it: a run is fixed by its seed and its steps, not its speed.
The report holds every run (test accuracy and macro-F1 of best/ and of the final weights, best
val accuracy, the val accuracy of every evaluation, last train loss, seconds) and, per
(policy, mixing), the mean and the sample standard deviation over the seeds.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from carbrand.bench.train_worker import die_with_bench
from carbrand.config import AUGMENT_POLICIES
from carbrand.errors import CarbrandError, UsageError

# What `--mix` names: the mixing settings of one sweep arm. "on" is timm's usual pair at a
# strength suited to small from-scratch runs: mixup Beta(0.2, 0.2) or CutMix Beta(1, 1), half each.
MIX_SETTINGS = {
    "off": {"train.mixup_alpha": 0.0, "train.cutmix_alpha": 0.0},
    "mixup": {"train.mixup_alpha": 0.2, "train.cutmix_alpha": 0.0},
    "cutmix": {"train.mixup_alpha": 0.0, "train.cutmix_alpha": 1.0},
    "on": {"train.mixup_alpha": 0.2, "train.cutmix_alpha": 1.0, "train.mix_switch_prob": 0.5},
}
SUMMARISED = ("accuracy", "macro_f1", "last_accuracy", "last_macro_f1", "best_val_accuracy", "train_seconds")
# Both the exported model (best/, chosen on val) and the final weights are scored: on a small val split the
# choice of best/ is itself noisy, and the two figures show what it costs.
EVALUATIONS = {"best": "test", "last": "test_last"}
POLL_SECONDS = 0.5  # how often the running cells' processes are checked


@dataclass(frozen=True)
class Cell:
    augment: str
    mix: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.augment}-mix_{self.mix}-seed{self.seed}"


def parse_choices(text: str, allowed, option: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise UsageError(f"{option} takes a comma list of {', '.join(allowed)}; got {text!r}")
    return values


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--seeds takes a comma list of integers; got {text!r}") from None
    if not seeds:
        raise UsageError("--seeds is empty")
    return seeds


def cells(args) -> list[Cell]:
    augments = parse_choices(args.augment, AUGMENT_POLICIES, "--augment")
    mixes = parse_choices(args.mix, tuple(MIX_SETTINGS), "--mix")
    return [Cell(a, m, s) for a in augments for m in mixes for s in parse_seeds(args.seeds)]


def train_command(args, cell: Cell, run_dir: Path) -> list[str]:
    settings = {"data.augment": cell.augment, "train.seed": cell.seed, **MIX_SETTINGS[cell.mix]}
    return [sys.executable, "-m", "carbrand.cli", "train", "--config", args.config,
            f"data.manifest={args.manifest}", f"output.dir={run_dir}", "train.resume=never", "wandb.mode=disabled",
            *args.overrides, *(f"{key}={value}" for key, value in settings.items())]


def evaluate_command(args, run_dir: Path, weights: str) -> list[str]:
    """Score `weights` (best: what the run exported; last: its final checkpoint) on the test split."""
    return [sys.executable, "-m", "carbrand.cli", "evaluate", "--checkpoint", str(run_dir / weights),
            "--data", args.manifest, "--split", args.split, "--out", str(run_dir / EVALUATIONS[weights]),
            "--wandb-mode", "disabled"]


@dataclass
class RunningCell:
    """A cell whose steps (train, evaluate best/, evaluate the final weights) run one after another."""

    cell: Cell
    run_dir: Path
    steps: list[tuple[str, list[str]]]
    started: float
    step: str = ""
    process: subprocess.Popen | None = None
    log: IO[str] | None = None
    train_seconds: float = 0.0


def start_cell(args, cell: Cell) -> RunningCell:
    run_dir = Path(args.work_dir) / cell.name
    run_dir.mkdir(parents=True, exist_ok=True)
    steps = [("train", train_command(args, cell, run_dir)), ("evaluate", evaluate_command(args, run_dir, "best")),
             ("evaluate_last", evaluate_command(args, run_dir, "last"))]
    return RunningCell(cell, run_dir, steps, time.monotonic())


def start_next_step(running: RunningCell, env: dict[str, str]) -> None:
    running.step, command = running.steps.pop(0)
    running.log = open(running.run_dir / f"{running.step}.log", "w")
    # The child dies with the bench however the bench ends (kill -9 included): no orphan trains on.
    running.process = subprocess.Popen(command, stdout=running.log, stderr=subprocess.STDOUT, env=env,
                                       preexec_fn=functools.partial(die_with_bench, os.getpid()))


def step_finished(running: RunningCell, env: dict[str, str]) -> bool:
    """Whether the cell is done; starts its next step when one finished; a failure names the cell and its log."""
    code = running.process.poll()
    if code is None:
        return False
    running.log.close()
    log = running.run_dir / f"{running.step}.log"
    if code != 0:
        last = (log.read_text().strip().splitlines() or ["no output"])[-1][-300:]
        raise CarbrandError(f"bench accuracy: {running.step} of {running.cell.name} failed (exit {code}, {log}): {last}")
    if running.step == "train":
        running.train_seconds = time.monotonic() - running.started
    if running.steps:
        start_next_step(running, env)
        return False
    (running.run_dir / "sweep_cell.json").write_text(json.dumps({"train_seconds": running.train_seconds}) + "\n")
    return True


def read_cell(args, cell: Cell) -> dict:
    run_dir = Path(args.work_dir) / cell.name
    test, last = (json.loads((run_dir / out / "metrics.json").read_text()) for out in EVALUATIONS.values())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [r["val/accuracy"] for r in records if "val/accuracy" in r]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    timing = json.loads((run_dir / "sweep_cell.json").read_text())
    return {"augment": cell.augment, "mix": cell.mix, "seed": cell.seed, "run_dir": str(run_dir),
            "accuracy": test["accuracy"], "macro_f1": test["macro_f1"], "test_samples": test["samples"],
            "last_accuracy": last["accuracy"], "last_macro_f1": last["macro_f1"],
            "best_val_accuracy": max(val) if val else None, "val_accuracy_per_eval": val,
            "last_train_loss": losses[-1] if losses else None, "train_seconds": timing["train_seconds"]}


def is_done(args, cell: Cell) -> bool:
    run_dir = Path(args.work_dir) / cell.name
    return all((run_dir / out / "metrics.json").is_file() for out in EVALUATIONS.values()) and (
        run_dir / "sweep_cell.json").is_file()


def summarise(runs: list[dict]) -> list[dict]:
    """Per (augment, mix): mean and sample sd over seeds (sd is None for one seed)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["augment"], run["mix"]), []).append(run)
    summary = []
    for (augment, mix), group in groups.items():
        row = {"augment": augment, "mix": mix, "seeds": [r["seed"] for r in group]}
        for key in SUMMARISED:
            values = [r[key] for r in group if r[key] is not None]
            row[f"{key}_mean"] = statistics.fmean(values) if values else None
            row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        summary.append(row)
    return summary


def markdown_table(summary: list[dict]) -> str:
    def cell(row: dict, key: str, digits: int = 3) -> str:
        mean, sd = row[f"{key}_mean"], row[f"{key}_sd"]
        return "–" if mean is None else f"{mean:.{digits}f}" + ("" if sd is None else f" ± {sd:.{digits}f}")

    lines = ["| augment | mixup/CutMix | seeds | test accuracy (best/) | test macro-F1 (best/) | test accuracy (final) "
             "| test macro-F1 (final) | best val accuracy | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for row in summary:
        lines.append(f"| {row['augment']} | {row['mix']} | {len(row['seeds'])} | {cell(row, 'accuracy')} | "
                     f"{cell(row, 'macro_f1')} | {cell(row, 'last_accuracy')} | {cell(row, 'last_macro_f1')} | "
                     f"{cell(row, 'best_val_accuracy')} | {cell(row, 'train_seconds', 0)} |")
    return "\n".join(lines)


def run_accuracy_benchmark(args) -> dict:
    if not Path(args.config).is_file():
        raise UsageError(f"--config {args.config}: no such file")
    if not (Path(args.manifest) / "manifest.json").is_file():
        raise UsageError(f"--manifest {args.manifest}: not a prepared dataset (no manifest.json); run carbrand prepare")
    if args.parallel < 1:
        raise UsageError(f"--parallel must be at least 1; got {args.parallel}")
    todo = cells(args)
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    runs = run_cells(args, todo, threads)
    summary = summarise(runs)
    print(markdown_table(summary), file=sys.stderr)
    return {"config": args.config, "manifest": args.manifest, "split": args.split, "overrides": args.overrides,
            "parallel": args.parallel, "threads_per_run": threads, "mix_settings": MIX_SETTINGS,
            "summary": summary, "runs": runs}


def run_cells(args, todo: list[Cell], threads: int) -> list[dict]:
    """Up to --parallel cells at once, their processes started and watched from this one thread."""
    results: dict[Cell, dict] = {}
    pending = []
    for cell in todo:
        if is_done(args, cell):
            results[cell] = read_cell(args, cell) | {"reused": True}
            print(f"carbrand bench: {cell.name}: done before, read from {args.work_dir}", file=sys.stderr)
        else:
            pending.append(cell)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), WANDB_MODE="disabled")
    running: list[RunningCell] = []
    try:
        while pending or running:
            while pending and len(running) < args.parallel:
                running.append(start_cell(args, pending.pop(0)))
                start_next_step(running[-1], env)
            time.sleep(POLL_SECONDS)
            for done in [r for r in running if step_finished(r, env)]:
                running.remove(done)
                result = results[done.cell] = read_cell(args, done.cell) | {"reused": False}
                print(f"carbrand bench: {done.cell.name}: test accuracy {result['accuracy']:.3f} (final weights "
                      f"{result['last_accuracy']:.3f}), {result['train_seconds']:.0f} s", file=sys.stderr)
    finally:  # a failed cell, Ctrl-C: the other cells' processes end with it
        for other in running:
            if other.process.poll() is None:
                other.process.kill()
                other.process.wait()
    return [results[cell] for cell in todo]


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="training recipe, e.g. configs/cars5_cpu.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides for every cell")
    parser.add_argument("--manifest", required=True, help="prepared dataset directory (carbrand prepare --out)")
    parser.add_argument("--augment", default="none,trivial,randaugment", help="comma list of data.augment policies")
    parser.add_argument("--mix", default="off,on", help=f"comma list of {', '.join(MIX_SETTINGS)} (default off,on)")
    parser.add_argument("--seeds", default="0,1,2", help="comma list of train.seed values (default 0,1,2)")
    parser.add_argument("--split", default="test", help="split the evaluator scores (default test)")
    parser.add_argument("--parallel", type=int, default=1, help="cells trained at once (default 1)")
    parser.add_argument("--work-dir", default="runs/sweep", help="one run directory per cell (default runs/sweep)")
