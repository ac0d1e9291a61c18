"""Optimizer and learning-rate schedule of the recipe.

Parameters fall in four groups: {backbone, head} x {decayed, not decayed}. Norm layers and
biases get no weight decay. Fine-tuning: the backbone may learn at a fraction of the head's
rate (optim.backbone_lr_scale) and BatchNorm may keep its pretrained statistics
(set_train_mode). The backbone is "frozen" for the first epochs by giving its
groups a zero learning rate rather than `requires_grad=False`: DDP fixes the set of
parameters it reduces when it wraps the model, so toggling requires_grad later breaks it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from carbrand.config import OptimConfig
from carbrand.model import head_prefix, is_head_parameter


@dataclass(frozen=True)
class Schedule:
    total_steps: int  # optimizer steps of the whole run
    warmup_steps: int
    frozen_backbone_steps: int  # backbone learning rate is 0 before this step
    min_lr_ratio: float
    backbone_lr_scale: float = 1.0  # discriminative learning rate: the backbone's peak is this share of the head's

    def factor(self, step: int) -> float:
        """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
        # 1) linear warm-up from ~0 so the first, noisiest steps do not wreck pretrained features
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        # 2) cosine decay from the peak to peak * min_lr_ratio at the last step
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine

    def backbone_factor(self, step: int) -> float:
        return 0.0 if step < self.frozen_backbone_steps else self.backbone_lr_scale * self.factor(step)


def peak_learning_rate(optim: OptimConfig, global_batch_size: int) -> float:
    """The linear scaling rule: lr is given for lr_reference_batch images per step."""
    if optim.lr_reference_batch == 0:
        return optim.lr
    return optim.lr * global_batch_size / optim.lr_reference_batch


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    groups = {(part, decay): [] for part in ("backbone", "head") for decay in (True, False)}
    head = head_prefix(model)
    for name, parameter in model.named_parameters():
        part = "head" if is_head_parameter(name, head) else "backbone"
        decay = parameter.ndim > 1  # conv and linear weights; norm weights and all biases are 1-D
        groups[(part, decay)].append(parameter)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "part": part}
        for (part, decay), params in groups.items()
        if params
    ]


def build_optimizer(model: nn.Module, optim: OptimConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    groups = parameter_groups(model, optim.weight_decay)
    # fused kernels on CUDA: one launch for all parameters instead of one per tensor
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, nesterov=optim.nesterov, **fused)
    return torch.optim.AdamW(groups, lr=lr, betas=(optim.momentum, 0.999), **fused)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    factors = [schedule.backbone_factor if group["part"] == "backbone" else schedule.factor for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def set_train_mode(model: nn.Module, freeze_batchnorm: bool) -> None:
    """model.train(); with `freeze_batchnorm`, BatchNorm layers stay in eval mode: they normalise with, and keep,
    their pretrained running statistics (small fine-tuning batches would otherwise overwrite them with noisy ones).
    Their scale and shift still learn."""
    model.train()
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
