"""The training recipe README promises, checked on the trainer's own code paths.

One short in-process run (cars5 at 32 px, 16 steps) serves several promises at once: best/ holds
the best validation step by `train.best_metric` (not the last), `train.keep_checkpoints` prunes,
`train.eval_every_steps` validates on the CPU, the learning rate follows the global batch
(`optim.lr_reference_batch`), warm-up then cosine down to `optim.min_lr_ratio`, norms and biases get
no weight decay, `model.freeze_backbone_epochs` holds the backbone still while the head learns, and
the EMA of the weights is what validation scores and best/ exports. The run goes through the real
`carbrand.train.train`; the test only watches it (after each optimizer step) and scripts the
validation scores, so that the best step is known in advance and is neither the last nor the best
by the other metric.

Gradient accumulation and clipping are checked on `train_step`, the trainer's step, with the
Accelerator the trainer makes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.training_runs import CPU_RECIPE, read_metrics

# 266 train images / batch 16 = 16 micro-batches per epoch; 2 per optimizer step: 8 steps per epoch, 16 in all.
STEPS_PER_EPOCH, TOTAL_STEPS = 8, 16
GLOBAL_BATCH = 16 * 2  # data.batch_size x 1 process x train.grad_accum_steps
LR, REFERENCE_BATCH, MIN_LR_RATIO, WARMUP_STEPS, WEIGHT_DECAY, EMA_DECAY = 0.004, 128, 0.1, 4, 0.05, 0.5
RECIPE = ("data.image_size=32", "data.workers=0", "data.loader=torchvision", "data.batch_size=16",
          "train.grad_accum_steps=2", "train.epochs=2", "train.log_every=4", "model.freeze_backbone_epochs=1",
          f"train.ema_decay={EMA_DECAY}", "train.eval_every_steps=4", "train.checkpoint_every_steps=4",
          "train.keep_checkpoints=3", "train.best_metric=macro_f1", "optim.name=adamw", f"optim.lr={LR}",
          f"optim.lr_reference_batch={REFERENCE_BATCH}", "optim.warmup_epochs=0.5", f"optim.min_lr_ratio={MIN_LR_RATIO}",
          f"optim.weight_decay={WEIGHT_DECAY}", "train.seed=7")
# Scripted validation scores by step: best macro-F1 at step 12, best accuracy at step 8, the last at 16.
MACRO_F1 = {4: 0.30, 8: 0.10, 12: 0.60, 16: 0.20}
ACCURACY = {4: 0.20, 8: 0.90, 12: 0.10, 16: 0.30}
WATCHED = ("conv1.weight", "fc.weight", "bn1.running_mean")  # a backbone weight, the head, a BatchNorm buffer


@dataclass
class StepRecord:
    step: int
    lr_by_part: dict[str, list[float]]  # the learning rates this step used, per parameter group
    backbone_as_initialised: bool
    live: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]


@dataclass
class WatchedRun:
    run_dir: Path
    initial: dict[str, torch.Tensor] = field(default_factory=dict)  # every parameter as built
    steps: list[StepRecord] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)  # (names, weight_decay, part) of each optimizer group
    lr_after_last_step: list[float] = field(default_factory=list)
    validated_at: list[int] = field(default_factory=list)  # the step of each validation, in order
    saved_at: list[int] = field(default_factory=list)  # the step of each checkpoint write, in order


def watch(monkeypatch: pytest.MonkeyPatch, watched: WatchedRun) -> None:
    """Record the model as built, then after every optimizer step; script the validation scores."""
    import carbrand.train as trainer

    build_model, finish_optimizer_step, validate = trainer.build_model, trainer.finish_optimizer_step, trainer.validate
    save_checkpoint = trainer.save_checkpoint

    def recording_build_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        watched.initial.update({name: p.detach().clone() for name, p in model.named_parameters()})
        return model

    def recording_step(run) -> None:
        if not watched.groups:
            names = {id(p): name for name, p in run.unwrapped_model.named_parameters()}
            watched.groups = [{"names": [names[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"],
                               "part": g["part"]} for g in run.optimizer.param_groups]
        used = {"head": [], "backbone": []}
        for group in run.optimizer.param_groups:
            used[group["part"]].append(group["lr"])
        finish_optimizer_step(run)
        live = dict(run.unwrapped_model.named_parameters()) | dict(run.unwrapped_model.named_buffers())
        ema = dict(run.ema_model.module.named_parameters()) | dict(run.ema_model.module.named_buffers())
        unchanged = all(torch.equal(p, watched.initial[name]) for name, p in run.unwrapped_model.named_parameters()
                        if not name.startswith("fc."))
        watched.steps.append(StepRecord(run.progress.step, used, unchanged,
                                        {k: live[k].detach().clone() for k in WATCHED},
                                        {k: ema[k].detach().clone() for k in WATCHED}))
        watched.lr_after_last_step = [g["lr"] for g in run.optimizer.param_groups]

    def scripted_validate(run) -> dict:
        summary = validate(run)  # the real validation runs; only its scores are replaced
        step = run.progress.step
        watched.validated_at.append(step)
        return summary | {"macro_f1": MACRO_F1[step], "accuracy": ACCURACY[step]}

    def recording_save(run) -> None:
        watched.saved_at.append(run.progress.step)
        save_checkpoint(run)

    monkeypatch.setattr(trainer, "build_model", recording_build_model)
    monkeypatch.setattr(trainer, "finish_optimizer_step", recording_step)
    monkeypatch.setattr(trainer, "validate", scripted_validate)
    monkeypatch.setattr(trainer, "save_checkpoint", recording_save)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread, as the subprocess tests get through OMP_NUM_THREADS=1: on a shared 2-core machine
    torch's pool spins while it waits (measured here under load: 324 s for this file with 2 threads, 42 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def watched_run(prepared_cars5, tmp_path_factory, one_torch_thread) -> WatchedRun:
    from accelerate.state import AcceleratorState

    from carbrand.config import load_config
    from carbrand.train import train

    run_dir = tmp_path_factory.mktemp("recipe") / "run"
    config = load_config(CPU_RECIPE, [f"data.manifest={prepared_cars5}", f"output.dir={run_dir}", *RECIPE])
    watched = WatchedRun(run_dir)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("WANDB_MODE", "disabled")
        watch(monkeypatch, watched)
        try:
            assert train(config) == 0
        finally:
            AcceleratorState._reset_state(True)
    assert [record.step for record in watched.steps] == list(range(1, TOTAL_STEPS + 1))
    return watched


def test_best_holds_the_best_validation_step_by_best_metric_not_the_last(watched_run):
    run_dir = watched_run.run_dir
    validations = [r for r in read_metrics(run_dir) if "val/macro_f1" in r]
    assert [r["step"] for r in validations] == [4, 8, 12, 16]  # eval_every_steps=4 on the CPU
    best = load_file(str(run_dir / "best" / "model.safetensors"))
    # train.ema_decay > 0: validation scores the EMA weights, and best/ exports them
    ema_at = {step: load_file(str(run_dir / "checkpoints" / f"step_{step}" / "ema.safetensors")) for step in (8, 12, 16)}
    live_at_12 = load_file(str(run_dir / "checkpoints" / "step_12" / "model.safetensors"))
    assert sorted(best) == sorted(ema_at[12])
    assert all(torch.equal(best[k], ema_at[12][k]) for k in best), "best/ is not the EMA weights of step 12 (best macro-F1)"
    for other, why in ((16, "the last step"), (8, "the best accuracy, not train.best_metric")):
        assert not torch.equal(best["fc.weight"], ema_at[other]["fc.weight"]), f"best/ holds {why}"
    assert not torch.equal(best["fc.weight"], live_at_12["fc.weight"]), "best/ holds the live weights, not the EMA"


def test_each_step_is_validated_and_saved_once_where_the_periods_meet_the_epoch_and_run_ends(watched_run):
    """eval_every_steps=4 divides the 16 steps, and checkpoint_every_steps=4 divides each epoch's last step (8, 16):
    the epoch end, which validates the last step and saves every epoch's last one, does not repeat the periodic ones."""
    assert watched_run.validated_at == [4, 8, 12, 16]
    assert watched_run.saved_at == [4, 8, 12, 16]


def test_keep_checkpoints_keeps_the_newest(watched_run):
    run_dir = watched_run.run_dir
    # saved at 4, 8, 12 and 16 (checkpoint_every_steps=4 and the epoch ends); train.keep_checkpoints=3
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_12", "step_16", "step_8"]
    assert (run_dir / "last").resolve() == (run_dir / "checkpoints" / "step_16").resolve()


def expected_head_lr(step: int) -> float:
    """The README's recipe for optimizer step `step` (1-based): lr scaled by the global batch, linear warm-up
    from ~0 to the peak, then a cosine from the peak down to peak x min_lr_ratio at the end of the run."""
    peak = LR * GLOBAL_BATCH / REFERENCE_BATCH
    if step <= WARMUP_STEPS:
        return peak * step / WARMUP_STEPS
    progress = (step - 1 - WARMUP_STEPS) / (TOTAL_STEPS - WARMUP_STEPS)
    return peak * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_learning_rate_scales_with_the_global_batch_warms_up_then_follows_a_cosine(watched_run):
    head = [record.lr_by_part["head"] for record in watched_run.steps]
    assert all(len(set(lrs)) == 1 for lrs in head), "the head's groups disagree"
    assert [lrs[0] for lrs in head] == pytest.approx([expected_head_lr(s) for s in range(1, TOTAL_STEPS + 1)], rel=1e-9)
    assert max(lrs[0] for lrs in head) == pytest.approx(LR * GLOBAL_BATCH / REFERENCE_BATCH, rel=1e-9)
    peak = LR * GLOBAL_BATCH / REFERENCE_BATCH
    assert watched_run.lr_after_last_step == pytest.approx([peak * MIN_LR_RATIO] * len(watched_run.groups), rel=1e-9)
    # model.freeze_backbone_epochs=1: the backbone's rate is 0 for the first epoch, then the head's
    for record in watched_run.steps:
        expected = 0.0 if record.step <= STEPS_PER_EPOCH else expected_head_lr(record.step)
        assert record.lr_by_part["backbone"] == pytest.approx([expected] * 2, rel=1e-9, abs=0), record.step


def test_norms_and_biases_get_no_weight_decay(watched_run):
    from carbrand.model import build_model

    model = build_model("resnet18", 5)
    norm_parameters = {f"{module_name}.{name}" for module_name, module in model.named_modules()
                       if isinstance(module, torch.nn.modules.batchnorm._NormBase) for name, _ in module.named_parameters()}
    assert norm_parameters, "no norm layer found: the check would prove nothing"
    seen = []
    for group in watched_run.groups:
        for name in group["names"]:
            undecayed = name in norm_parameters or name.endswith(".bias")
            assert group["weight_decay"] == (0.0 if undecayed else WEIGHT_DECAY), (name, group["weight_decay"])
            assert group["part"] == ("head" if name.startswith("fc.") else "backbone"), name
            seen.append(name)
    assert sorted(seen) == sorted(name for name, _ in model.named_parameters()), "each parameter in exactly one group"


def test_frozen_backbone_stays_as_initialised_for_its_epochs_while_the_head_learns(watched_run):
    steps = watched_run.steps
    assert [r.backbone_as_initialised for r in steps] == [True] * STEPS_PER_EPOCH + [False] * STEPS_PER_EPOCH
    heads = [watched_run.initial["fc.weight"]] + [r.live["fc.weight"] for r in steps]
    assert all(not torch.equal(before, after) for before, after in zip(heads, heads[1:])), "the head must learn every step"


def test_ema_averages_the_weights_and_buffers_at_every_step(watched_run):
    steps = watched_run.steps
    for name in WATCHED:
        assert torch.equal(steps[0].ema[name], steps[0].live[name])  # the first update starts from the weights
        for before, now in zip(steps, steps[1:]):
            expected = EMA_DECAY * before.ema[name] + (1 - EMA_DECAY) * now.live[name]
            torch.testing.assert_close(now.ema[name], expected, rtol=1e-5, atol=1e-6, msg=f"{name} at step {now.step}")
        assert not torch.equal(steps[-1].ema[name], steps[-1].live[name]), f"the EMA of {name} does not lag"


# ----------------------------------------------------------------------------- accumulation and clipping


def step_once(tmp_path, model_state, images, labels, micro_batches: int, clip: float) -> dict[str, torch.Tensor]:
    """One optimizer step through the trainer's Accelerator and `train_step`, over `micro_batches` equal slices."""
    from accelerate.state import AcceleratorState, GradientState

    from carbrand.config import load_config
    from carbrand.model import build_model
    from carbrand.train import make_accelerator, train_step
    from carbrand.training.optimization import build_optimizer

    config = load_config(CPU_RECIPE, [f"output.dir={tmp_path / 'unused'}",
                                      f"train.grad_accum_steps={micro_batches}", f"optim.grad_clip_norm={clip}",
                                      "optim.name=sgd", "optim.weight_decay=0", "optim.lr=1.0"])
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = make_accelerator(config)
    model = build_model("resnet18", 5)
    model.load_state_dict(model_state)
    model.eval()  # BatchNorm set aside: running statistics make a batch's output independent of its company
    optimizer = build_optimizer(model, config.optim, config.optim.lr, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    for chunk_images, chunk_labels in zip(images.chunk(micro_batches), labels.chunk(micro_batches)):
        train_step(accelerator, model, optimizer, chunk_images, chunk_labels, label_smoothing=0.1,
                   grad_clip_norm=config.optim.grad_clip_norm)
    return {name: p.detach().clone() for name, p in accelerator.unwrap_model(model).named_parameters()}


def update_of(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(after[name] - before[name]).reshape(-1) for name in after])


def test_accumulated_micro_batches_give_the_update_of_one_large_batch_and_clipping_bounds_the_norm(
        tmp_path, fresh_accelerate_state, one_torch_thread):
    from carbrand.model import build_model

    torch.manual_seed(0)
    initial = build_model("resnet18", 5).state_dict()
    before = {name: tensor.clone() for name, tensor in initial.items()}
    images, labels = torch.randn(16, 3, 32, 32), torch.arange(16) % 5
    # SGD at lr 1 without weight decay: the first step moves the weights by exactly minus the (clipped) gradient
    unclipped = update_of(step_once(tmp_path, initial, images, labels, 1, clip=0), before)
    accumulated = update_of(step_once(tmp_path, initial, images, labels, 4, clip=0), before)
    gradient_norm = unclipped.norm().item()
    assert gradient_norm > 0.1, "the step changed too little: the comparison would prove nothing"
    torch.testing.assert_close(accumulated, unclipped, rtol=1e-4, atol=1e-6 * gradient_norm)

    clip = gradient_norm / 4
    clipped_one = update_of(step_once(tmp_path, initial, images, labels, 1, clip=clip), before)
    clipped_four = update_of(step_once(tmp_path, initial, images, labels, 4, clip=clip), before)
    for clipped in (clipped_one, clipped_four):
        # the global norm (all parameters together) is brought down to the bound, the direction kept
        assert clipped.norm().item() == pytest.approx(clip, rel=1e-3)  # (float32 differences of the weights)
        torch.testing.assert_close(clipped, unclipped * (clip / gradient_norm), rtol=1e-3, atol=1e-6 * gradient_norm)


def test_best_metric_last_exports_the_final_weights_whatever_val_says(prepared_cars5, tmp_path, one_torch_thread):
    """`train.best_metric: last`: validation still runs and is logged, but best/ ends as the final weights, here
    while the scripted val accuracy only falls (every other metric would keep step 4's model)."""
    from accelerate.state import AcceleratorState

    import carbrand.train as trainer
    from carbrand.config import load_config

    falling = {4: 0.9, 8: 0.6, 12: 0.3, 16: 0.1}
    validate = trainer.validate
    run_dir = tmp_path / "run"
    config = load_config(CPU_RECIPE, [f"data.manifest={prepared_cars5}", f"output.dir={run_dir}", "data.image_size=32",
                                      "data.workers=0", "data.loader=torchvision", "train.epochs=1",
                                      "train.eval_every_steps=4", "train.best_metric=last", "wandb.mode=disabled"])
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(trainer, "validate", lambda run: validate(run) | {"accuracy": falling[run.progress.step]})
        try:
            assert trainer.train(config) == 0
        finally:
            AcceleratorState._reset_state(True)
    assert [r["val/accuracy"] for r in read_metrics(run_dir) if "val/accuracy" in r] == [0.9, 0.6, 0.3, 0.1]
    best = load_file(str(run_dir / "best" / "model.safetensors"))
    final = load_file(str(run_dir / "checkpoints" / "step_16" / "model.safetensors"))
    assert sorted(best) == sorted(final) and all(torch.equal(best[k], final[k]) for k in best), \
        "best/ is not the final weights"
