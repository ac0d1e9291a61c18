"""Stop a run whose loss or weights (buffers included) became NaN/inf, before anything from it is logged as good or saved.

The loop marks each optimizer step's loss on the device (no host sync per step); the
check reads the marks of every rank in one small gather, and runs only at the loop's
sync points: a log, a validation, a checkpoint. The newest checkpoint is therefore
always from before the blow-up.

fp16 steps that the grad scaler skipped for inf/NaN gradients are its routine, not a
divergence: `ScalerSkips` tells the loop which steps those were.
"""

from __future__ import annotations

from pathlib import Path

import torch

from carbrand.checkpoint import step_checkpoints
from carbrand.errors import CarbrandError


class DivergenceGuard:
    def __init__(self, device: torch.device):
        # first optimizer step whose loss was NaN/inf (0 = none); stays on the device
        self.first_nonfinite_step = torch.zeros((), dtype=torch.long, device=device)
        self._step_loss_nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self._checked_at_step = -1

    def observe_loss(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss, inside the current optimizer step."""
        self._step_loss_nonfinite |= ~torch.isfinite(loss)

    def end_step(self, step: int, applied: bool) -> None:
        """Optimizer step `step` (1-based) is done; `applied` is False when the fp16 scaler skipped it."""
        if applied:  # a skipped step left the weights untouched: its inf loss is the scaler's routine
            first = self.first_nonfinite_step
            self.first_nonfinite_step = torch.where(self._step_loss_nonfinite & (first == 0), step, first)
        self._step_loss_nonfinite.zero_()

    def check(self, accelerator, model: torch.nn.Module, step: int, run_dir: Path) -> None:
        """Raise on every rank if any rank applied a NaN/inf loss or holds NaN/inf weights or buffers (a collective).

        Checked once per step at most: a later sync point of the same step sees the same weights.
        """
        if step == self._checked_at_step:
            return
        self._checked_at_step = step
        # the buffers too: BatchNorm's running variance overflows to inf before any weight or loss does (measured
        # at lr 1e6), and a checkpoint or export holding it is as useless as one with inf weights
        state = [t.detach().isfinite().all() for t in model.state_dict().values() if t.is_floating_point()]
        weights_finite = torch.stack(state).all()
        local = torch.stack([self.first_nonfinite_step, (~weights_finite).long()]).reshape(1, 2)
        found = accelerator.gather(local)  # one row per rank: first non-finite step (0 = none), weights non-finite
        steps = [s for s in found[:, 0].tolist() if s > 0]  # host sync: this is a sync point anyway
        if not steps and not found[:, 1].any():
            return
        what = (f"the loss became NaN or inf at step {min(steps)}" if steps
                else f"the weights became NaN or inf by step {step}")
        saved = step_checkpoints(run_dir)
        newest = f"{saved[-1][1]} (step {saved[-1][0]})" if saved else "none yet"
        raise CarbrandError(f"training diverged: {what}; stopped without saving it. Newest checkpoint, from before: {newest}. "
                            f"Lower optim.lr, raise optim.warmup_epochs or set optim.grad_clip_norm")


class ScalerSkips:
    """fp16: did the grad scaler skip the optimizer step that just ran (inf/NaN gradients)?

    Accelerate's `optimizer_step_was_skipped` only notices when the optimizer's `step` was not
    called. A fused optimizer (the CUDA default here) is always called and skips inside its kernel,
    so Accelerate reports every step as applied. The loss scale tells for sure: the scaler's update
    multiplies it by the backoff factor (< 1) exactly when it found inf/NaN gradients, and
    otherwise keeps it or grows it.
    """

    def __init__(self, scaler):
        self._scaler = scaler  # None unless fp16
        self._scale_before: torch.Tensor | float | None = None  # the scale the step just taken ran with

    def step_was_skipped(self, accelerator) -> bool:
        skipped = accelerator.optimizer_step_was_skipped  # non-fused optimizers, and the CPU tests' stand-in
        if self._scaler is None:
            return skipped
        # `_scale` is the device tensor behind `get_scale()`, which would add a second host sync per step.
        # The first step ran with the initial (or, after a resume, the restored) scale, `_init_scale`.
        scale = self._scaler._scale
        before = self._scaler._init_scale if self._scale_before is None else self._scale_before
        self._scale_before = scale.clone()  # `update()` changes `_scale` in place
        # host sync, fp16 only: one per optimizer step, because the schedule must know now whether to advance
        return skipped or bool(scale < before)
