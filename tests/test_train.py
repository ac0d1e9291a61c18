"""The trainer with real processes on real photos (cars5): DDP over gloo, resume, exports, W&B offline."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from carbrand.checkpoint import load_export_model, load_training_checkpoint
from carbrand.inference.calibration import load_calibration
from carbrand.model import build_model
from tests.helpers.fault_runs import (
    TINY,
    complete_checkpoints,
    error_line,
    fault_environment,
    start,
)
from tests.helpers.paths import HELPERS, REPO
from tests.helpers.ports import free_port
from tests.helpers.subprocesses import assert_ok, subprocess_environment
from tests.helpers.training_runs import (
    last_value,
    launch_command,
    probed_train_command,
    read_metrics,
    run_training,
)
from tests.helpers.wandb_records import read_history


def assert_complete_run_dir(run_dir):
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.jsonl").is_file()
    for name in ("model.safetensors", "classes.json", "config.yaml"):
        assert (run_dir / "best" / name).is_file(), name
    assert (run_dir / "last").resolve().parent == (run_dir / "checkpoints").resolve()
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")], "temporary left behind"


@pytest.mark.slow
def test_two_processes_train_on_cars5_and_ranks_agree(prepared_cars5, tmp_path):
    """The recipe's loader, 2 ranks over gloo. "Ranks agree" is read from each rank's own state (every tensor of its
    state dict, buffers included, written by tests/helpers/rank_state_probe.py), not from the trainer's flag."""
    run_dir, out = tmp_path / "run", tmp_path / "probe"
    result = run_probe(prepared_cars5, run_dir, out, "train.epochs=2", base=())
    assert_ok(result)
    assert_complete_run_dir(run_dir)
    (rank0, _), (rank1, _) = probed(out, 0), probed(out, 1)
    assert sorted(rank0) == sorted(rank1) and any(name.endswith("running_mean") for name in rank0)
    different = [name for name in rank0 if not torch.equal(rank0[name], rank1[name])]
    assert not different, f"{len(different)} tensors differ between the ranks, e.g. {different[:4]}"
    records = read_metrics(run_dir)
    assert last_value(records, "run/world_size") == 2
    assert last_value(records, "run/ranks_agree") is True
    # 266 train images / 2 ranks / batch 16 = 8 steps per epoch
    assert last_value(records, "run/total_steps") == 2 * (len(read_split(prepared_cars5, "train")) // 2 // 16)
    val_samples = last_value(records, "val/samples")
    assert val_samples == len(read_split(prepared_cars5, "val"))  # exact across ranks: none dropped, none twice
    model, export = load_export_model(run_dir / "best")
    assert export.classes == json.loads((prepared_cars5 / "classes.json").read_text())
    assert model.fc.out_features == 5
    assert result.stdout.count("carbrand: done") == 1  # only the main process reports
    # best/ was calibrated on val when training ended: each rank fitted the gathered logits, and they agreed
    calibration = load_calibration(run_dir / "best")
    assert calibration.samples == val_samples and calibration.temperature > 0
    assert last_value(records, "calibration/ranks_agree") is True
    assert last_value(records, "calibration/temperature") == calibration.temperature
    alone = calibrate_in_process(run_dir / "best", prepared_cars5)  # one process, other batches: the same fit
    assert alone.temperature == pytest.approx(calibration.temperature, rel=1e-6)
    assert alone.threshold == pytest.approx(calibration.threshold, rel=1e-6)


def calibrate_in_process(export, prepared):
    from accelerate.state import AcceleratorState

    from carbrand.cli import run_command

    copy = export.parent / "best_recalibrated"
    shutil.copytree(export, copy)
    try:
        assert run_command("calibrate", ["--checkpoint", str(copy), "--data", str(prepared), "--batch-size", "7"]) == 0
    finally:
        AcceleratorState._reset_state(True)
    return load_calibration(copy)


def read_split(prepared, split):
    return (prepared / f"{split}.csv").read_text().splitlines()[1:]


def test_ddp_update_equals_single_process_with_double_batch(tmp_path):
    worker = HELPERS / "ddp_step_worker.py"
    env = subprocess_environment()
    single, double = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    for processes, out in ((1, single), (2, double)):
        result = subprocess.run(launch_command(processes, worker) + [str(out)], capture_output=True, text=True,
                                timeout=300, env=env, cwd=REPO)
        assert_ok(result)
    torch.manual_seed(0)
    initial = build_model("resnet18", num_classes=5).state_dict()
    one, two = load_file(str(single)), load_file(str(double))
    largest_update = max((one[k] - initial[k]).abs().max().item() for k in one if one[k].is_floating_point())
    largest_difference = max((one[k] - two[k]).abs().max().item() for k in one if one[k].is_floating_point())
    assert largest_update > 1e-3, "the step changed nothing: the comparison would prove nothing"
    assert largest_difference < 1e-4 * max(1.0, largest_update), (largest_difference, largest_update)


def test_wandb_offline_run_holds_the_logged_values(prepared_cars5, tmp_path):
    run_dir = tmp_path / "run"
    env = subprocess_environment() | {"WANDB_MODE": "offline", "WANDB_API_KEY": "x" * 40}
    result = run_training(prepared_cars5, run_dir, "train.max_steps=6", "train.log_every=2", "wandb.mode=offline",
                          env=env)
    assert_ok(result)
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list((run_dir / "wandb").rglob("*"))
    history = read_history(runs[0])
    local = [r for r in read_metrics(run_dir) if "train/loss" in r]
    logged = {row["_step"]: row for row in history if "train/loss" in row}
    assert sorted(logged) == [r["step"] for r in local] == [2, 4, 6]
    for record in local:
        assert logged[record["step"]]["train/loss"] == pytest.approx(record["train/loss"], rel=1e-6)
        assert logged[record["step"]]["train/images_per_second"] > 0
    assert any("val/accuracy" in row for row in history)

    # Resumed for two more steps, the W&B run continues under the same id. W&B has already seen step 6 and
    # keeps nothing logged at a step it has seen (a resumed run starts at the next step): the restart must
    # reach it at a later step. (Offline, the client cannot know what the server saw, so the rule is applied here.)
    result = run_training(prepared_cars5, run_dir, "train.max_steps=8", "train.log_every=2", "wandb.mode=offline",
                          env=env)
    assert_ok(result)
    resumed = [path for path in (run_dir / "wandb").glob("offline-run-*/run-*.wandb") if path != runs[0]]
    assert len(resumed) == 1, list((run_dir / "wandb").rglob("*"))
    kept = [row for row in read_history(resumed[0]) if row["_step"] > 6]
    assert [row["_step"] for row in kept if "train/loss" in row] == [8]
    assert [row.get("run/restarts") for row in kept if "train/loss" in row] == [1], kept
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if r.get("run/restarts") == 1][0] == 6  # metrics.jsonl: where it happened
    for saved in [run_dir / "config.yaml", run_dir / "metrics.jsonl"]:
        assert "x" * 40 not in saved.read_text()  # the API key never lands in the run directory


def test_bf16_on_a_cpu_without_native_bf16_warns_once_per_run(prepared_cars5, tmp_path):
    """Two ranks, logging every step, on a CPU that reports no bf16 instructions: one warning line in all their output.
    The run goes on in bf16 to its end, the calibration fit included (the val loader hands it bf16 images)."""
    run_dir = tmp_path / "run"
    result = run_training(prepared_cars5, run_dir, *TINY, "train.precision=bf16", "train.max_steps=2", "train.log_every=1",
                          num_processes=2, env=fault_environment(), script=HELPERS / "cpu_without_bf16_train.py")
    assert_ok(result)
    output = (result.stdout + result.stderr).splitlines()
    warnings = [line for line in output if "without native bf16" in line]
    assert len(warnings) == 1, "\n".join(warnings) or result.stdout[-3000:]
    assert warnings[0].startswith("carbrand: warning: train.precision=bf16") and "train.precision=auto" in warnings[0]
    assert any("precision bf16 (as set)" in line for line in output), result.stdout[-3000:]
    assert (run_dir / "best" / "calibration.json").is_file()


def test_missing_dataset_is_one_line_error(tmp_path):
    result = run_training(tmp_path / "nowhere", tmp_path / "run")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nowhere" in lines[0] and "carbrand prepare" in lines[0], result.stderr


def test_unknown_key_fails_before_anything_is_written(prepared_cars5, tmp_path):
    result = run_training(prepared_cars5, tmp_path / "run", "optim.learning_rate=0.1")
    assert result.returncode == 2
    assert "optim.learning_rate" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_runs_as_module_and_console_script(prepared_cars5, tmp_path):
    for command in ([sys.executable, "-m", "carbrand.train"], ["carbrand", "train"]):
        run_dir = tmp_path / command[-1].replace(".", "_")
        result = subprocess.run(command + ["--config", str(REPO / "configs/cars5_cpu.yaml"), f"data.manifest={prepared_cars5}",
                                           f"output.dir={run_dir}", "train.max_steps=2"],
                                capture_output=True, text=True, timeout=300, env=subprocess_environment(), cwd=REPO)
        assert_ok(result)
        assert (run_dir / "best" / "model.safetensors").is_file()


@pytest.mark.slow
def test_it_learns_cars5_from_random_init(prepared_cars5, tmp_path):
    """The cars5 CPU recipe at 96 px, cut to 16 of its 40 epochs (the whole recipe is a benchmark:
    docs/TRAINING.md): the exported final weights beat chance (20%) on test."""
    run_dir = tmp_path / "run"
    result = run_training(prepared_cars5, run_dir, "data.image_size=96", "train.epochs=16")
    assert_ok(result)
    records = read_metrics(run_dir)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, "training loss did not fall"
    assert max(r["val/accuracy"] for r in records if "val/accuracy" in r) >= 0.3
    evaluation = subprocess.run([sys.executable, "-m", "carbrand.evaluate", "--checkpoint", str(run_dir / "best"),
                                 "--data", str(prepared_cars5), "--split", "test", "--out", str(tmp_path / "eval")],
                                capture_output=True, text=True, timeout=300, env=subprocess_environment(), cwd=REPO)
    assert_ok(evaluation)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["samples"] == 100
    # 32 or more right out of 100 happens by chance with probability < 0.5%; 16 epochs reach 0.40.
    assert metrics["accuracy"] >= 0.32, metrics["accuracy"]


# ----------------------------------------------------------------------------- several ranks, resumes, the EMA
# Small 2-rank runs at 32 px (266 train images / 2 ranks / batch 16 = 8 steps per epoch), loading in the process.
TWO_RANKS = (*TINY, "data.loader=torchvision", "train.collective_timeout_s=60")


def probe_command(prepared, run_dir, out, *overrides, num_processes=2, base=TWO_RANKS):
    """The trainer started through tests/helpers/rank_state_probe.py: each rank records its own state in `out`.
    `base`: overrides before the test's own (the quick 32 px settings unless given)."""
    return probed_train_command(prepared, run_dir, out, *base, *overrides, num_processes=num_processes)


def run_probe(prepared, run_dir, out, *overrides, num_processes=2, base=TWO_RANKS) -> subprocess.CompletedProcess:
    return subprocess.run(probe_command(prepared, run_dir, out, *overrides, num_processes=num_processes, base=base),
                          capture_output=True, text=True, timeout=600, env=fault_environment(), cwd=REPO)


def probed(out, rank) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(out / f"rank{rank}.safetensors")), json.loads((out / f"rank{rank}.json").read_text())


@pytest.mark.slow
def test_ranks_end_bit_identical_and_best_reproduces_its_validation(prepared_cars5, tmp_path):
    """Each rank's BatchNorm statistics follow its own shard (DDP does not broadcast buffers): they must be
    made equal before validation, checkpoints and the export, the EMA's too. Each rank's whole state is read
    here, not the trainer's verdict; then best/, evaluated alone, must score what the trainer logged for it, both
    averaging 3 crops along each photo's longer side (data.eval_crops)."""
    run_dir, out = tmp_path / "run", tmp_path / "probe"
    result = run_probe(prepared_cars5, run_dir, out, "train.epochs=1", "train.eval_every_steps=4", "train.ema_decay=0.5",
                       "train.best_metric=accuracy",  # best/ chosen on val (the CPU recipe exports its final weights)
                       "data.eval_crops=3")
    assert_ok(result)
    (rank0, _), (rank1, _) = probed(out, 0), probed(out, 1)
    assert sorted(rank0) == sorted(rank1)
    assert any(name.endswith("running_var") for name in rank0) and any(name.startswith("ema.") for name in rank0)
    different = [name for name in rank0 if not torch.equal(rank0[name], rank1[name])]
    assert not different, f"{len(different)} tensors differ between the ranks, e.g. {different[:4]}"

    validations = [r for r in read_metrics(run_dir) if "val/accuracy" in r]
    assert sorted({r["step"] for r in validations}) == [4, 8]
    best = max(validations, key=lambda r: r["val/accuracy"])  # the first of equal scores: a new best must beat the old
    evaluation = subprocess.run([sys.executable, "-m", "carbrand.evaluate", "--checkpoint", str(run_dir / "best"),
                                 "--data", str(prepared_cars5), "--split", "val", "--out", str(tmp_path / "eval")],
                                capture_output=True, text=True, timeout=300, env=fault_environment(), cwd=REPO)
    assert_ok(evaluation)
    alone = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert alone["samples"] == best["val/samples"] and alone["eval_crops"] == 3
    assert alone["accuracy"] == pytest.approx(best["val/accuracy"], abs=1e-9), (alone["accuracy"], best)


@pytest.mark.slow
def test_rank_with_a_stale_checkpoint_listing_resumes_from_rank_0s_choice(prepared_cars5, tmp_path):
    run_dir = tmp_path / "run"
    assert_ok(run_training(prepared_cars5, run_dir, *TWO_RANKS, "train.epochs=1", num_processes=2, env=fault_environment()))
    assert complete_checkpoints(run_dir) == [8]

    # Rank 1 lists checkpoints/ as empty (a stale directory cache on its node); it must still resume from step 8.
    out = tmp_path / "probe"
    result = run_probe(prepared_cars5, run_dir, out, "train.epochs=2", "--stale-listing-on-rank=1")
    assert_ok(result)
    assert f"resumed from {run_dir / 'checkpoints' / 'step_8'} at step 8" in result.stdout
    for rank in (0, 1):
        _, record = probed(out, rank)
        assert record["progress"]["step"] == 16 and record["progress"]["restarts"] == 1, (rank, record)
    assert "carbrand: done in 16 steps" in result.stdout
    assert max(r["step"] for r in read_metrics(run_dir)) == 16


@pytest.mark.slow
def test_rank_that_cannot_read_the_chosen_checkpoint_stops_every_rank_with_one_line(prepared_cars5, tmp_path):
    run_dir = tmp_path / "run"
    assert_ok(run_training(prepared_cars5, run_dir, *TWO_RANKS, "train.max_steps=2", num_processes=2,
                           env=fault_environment()))
    # One process per rank, as srun starts them (each rank's own output and exit code; no launcher traceback).
    command = probe_command(prepared_cars5, run_dir, tmp_path / "probe", "train.max_steps=4",
                            "--unreadable-checkpoint-on-rank=1", num_processes=1)
    port = str(free_port())
    ranks = [start(command, tmp_path / f"rank{rank}", env=fault_environment() | {
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for rank in (0, 1)]
    try:
        codes = [rank.wait(timeout=300) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert codes == [1, 1], [rank.stderr[-2000:] for rank in ranks]
    checkpoint = run_dir / "checkpoints" / "step_2"
    for rank in ranks:
        assert error_line(rank.stderr).startswith(f"carbrand train: error: rank 1 of 2 cannot read {checkpoint}, ")


RESUME_RUN = ("train.epochs=1", "train.log_every=1", "train.seed=3")  # 16 steps


def assert_same_state(expected, got, where: str) -> None:
    """Nested state (an optimizer's state_dict): the same keys, and every tensor equal bit for bit."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, expected), where
    elif isinstance(expected, dict):
        assert sorted(got, key=str) == sorted(expected, key=str), where
        for key in expected:
            assert_same_state(expected[key], got[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (e, g) in enumerate(zip(expected, got)):
            assert_same_state(e, g, f"{where}[{i}]")
    else:
        assert got == expected, (where, got, expected)


@pytest.mark.slow
def test_resume_after_a_stop_starts_from_the_checkpoint_and_matches_an_uninterrupted_run(prepared_cars5, tmp_path):
    """SIGUSR1 right after step 6 (tests/helpers/rank_state_probe.py sends it, so the stop lands there every time):
    step_6 is saved, exit 143. The resumed run must start from exactly the checkpoint's weights, buffers and
    optimizer state, and then log the uninterrupted run's losses, loss by loss. Same seed, and the torchvision
    loader draws each crop from (seed, rank, epoch, position); one thread per process: the same float32
    arithmetic in the same order, so the losses agree to float32 rounding (rel 1e-6)."""
    straight = tmp_path / "straight"
    assert_ok(run_training(prepared_cars5, straight, *TWO_RANKS, *RESUME_RUN, env=fault_environment()))
    total = last_value(read_metrics(straight), "run/total_steps")

    stopped = tmp_path / "stopped"
    result = run_probe(prepared_cars5, stopped, tmp_path / "first", *RESUME_RUN, "--signal-at-step=SIGUSR1:6",
                       num_processes=1)
    assert result.returncode == 143, result.stderr[-3000:]
    assert complete_checkpoints(stopped) == [6] and 6 < total
    result = run_probe(prepared_cars5, stopped, tmp_path / "second", *RESUME_RUN, "--record-start", num_processes=1)
    assert_ok(result)
    assert f"resumed from {stopped / 'checkpoints' / 'step_6'} at step 6" in result.stdout

    saved = load_training_checkpoint(stopped / "checkpoints" / "step_6")
    started = load_file(str(tmp_path / "second" / "start_rank0.safetensors"))
    assert sorted(started) == sorted(saved.model_state) and any(n.endswith("running_var") for n in started)
    different = [name for name in started if not torch.equal(started[name], saved.model_state[name])]
    assert not different, f"the resumed run did not start from the checkpoint's tensors: {different[:4]}"
    optimizer = torch.load(tmp_path / "second" / "start_rank0_optimizer.pt", weights_only=True)
    assert len(saved.training_state["optimizer"]["state"]) > 0, "no optimizer state to compare"
    assert_same_state(saved.training_state["optimizer"], optimizer, "optimizer")

    records = read_metrics(stopped)
    restart = next(i for i, r in enumerate(records) if r.get("run/restarts") == 1)
    resumed = {r["step"]: r["train/loss"] for r in records[restart:] if "train/loss" in r}
    uninterrupted = {r["step"]: r["train/loss"] for r in read_metrics(straight) if "train/loss" in r}
    assert sorted(resumed) == list(range(7, total + 1)), "the step counter must continue, not restart"
    for step in resumed:
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6), (step, resumed[step], uninterrupted[step])
    assert_complete_run_dir(stopped)


EMA_RUN = ("data.loader=torchvision", "train.epochs=1", "train.log_every=1", "train.seed=5", "train.ema_decay=0.9",
           "optim.warmup_epochs=0")


@pytest.mark.slow
def test_ema_after_a_stop_and_resume_matches_an_uninterrupted_run(prepared_cars5, tmp_path):
    """The EMA's update count is restored with its weights: otherwise the first update after the restart
    copies the live weights over the restored average. (Same step-by-step reproducibility as
    tests/faults/test_kill_and_resume.py: torchvision loader, same seed, same crops.)"""
    straight = tmp_path / "straight"
    assert_ok(run_training(prepared_cars5, straight, *TINY, *EMA_RUN, env=fault_environment()))

    stopped = tmp_path / "stopped"  # stopped right after step 6: several EMA updates are left to the resumed run
    result = run_probe(prepared_cars5, stopped, tmp_path / "probe", *EMA_RUN, "--signal-at-step=SIGUSR1:6", num_processes=1)
    assert result.returncode == 143, result.stderr[-3000:]
    stopped_at = complete_checkpoints(stopped)[-1]
    assert stopped_at == 6
    result = run_training(prepared_cars5, stopped, *TINY, *EMA_RUN, env=fault_environment())
    assert_ok(result)
    assert f"resumed from {stopped / 'checkpoints' / f'step_{stopped_at}'} at step {stopped_at}" in result.stdout

    def final(run_dir, name):
        return load_file(str(run_dir / "checkpoints" / "step_16" / name))

    live, ema = final(straight, "model.safetensors"), final(straight, "ema.safetensors")
    lag = max((live[k] - ema[k]).abs().max().item() for k in ema if ema[k].is_floating_point())
    assert lag > 1e-2, "the EMA must lag the live weights, or the comparison proves nothing"
    for name in ("model.safetensors", "ema.safetensors"):
        expected, resumed = final(straight, name), final(stopped, name)
        for key in expected:
            torch.testing.assert_close(resumed[key], expected[key], rtol=1e-3, atol=1e-4, msg=lambda m: f"{name} {key}: {m}")


@pytest.mark.slow
def test_compiled_model_accumulates_without_all_reduce_and_resumes_its_ema(prepared_cars5, tmp_path):
    """model.compile: the trainer must hold the plain module (Accelerate's unwrap keeps the compiled wrapper by
    default: `_orig_mod.` keys, and DDP's no_sync hidden, so every micro-batch all-reduces). TorchDynamo's eager
    backend builds the same wrappers as inductor and compiles in seconds on a CPU (inductor: minutes)."""
    run_dir = tmp_path / "run"
    common = ("model.compile=true", "train.grad_accum_steps=2", "train.ema_decay=0.9", "--dynamo-backend=eager")
    result = run_probe(prepared_cars5, run_dir, tmp_path / "first", *common, "train.max_steps=2")
    assert_ok(result)
    for rank in (0, 1):
        _, record = probed(tmp_path / "first", rank)
        assert record["all_reduces"]["at_step"] > 0, record
        assert record["all_reduces"]["inside_accumulation"] == 0, record

    result = run_probe(prepared_cars5, run_dir, tmp_path / "second", *common, "train.max_steps=3")
    assert_ok(result)
    assert f"resumed from {run_dir / 'checkpoints' / 'step_2'} at step 2" in result.stdout
    _, record = probed(tmp_path / "second", 0)
    assert record["progress"]["step"] == 3


def test_ema_count_comes_from_the_checkpoint_or_for_older_ones_from_the_step():
    from carbrand.checkpoint import TrainingCheckpoint
    from carbrand.train import Progress, make_ema

    model = build_model("resnet18", num_classes=5)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for saved, expected in (({"ema_updates": 5}, 5), ({}, 7)):  # {}: written before the count was saved
        checkpoint = TrainingCheckpoint(REPO / "runs" / "old" / "step_7", state, state, saved)
        assert int(make_ema(model, 0.9, checkpoint, Progress(step=7)).n_averaged) == expected
