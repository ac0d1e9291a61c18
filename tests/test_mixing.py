"""Mixup and CutMix (carbrand/training/mixing.py): the draws, the mixed batch, the soft-target loss, the step."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from carbrand.config import TrainConfig
from carbrand.train import train_step
from carbrand.training.mixing import NO_MIX, Mix, apply_mix, draw_mix, mixed_cross_entropy

BOTH = dataclasses.replace(TrainConfig(), mixup_alpha=0.2, cutmix_alpha=1.0, mix_switch_prob=0.5, seed=11)


def draw(train=BOTH, rank=0, epoch=0, batch=0) -> Mix:
    return draw_mix(train, rank=rank, epoch=epoch, batch=batch, batch_size=8, image_size=32)


def same(a: Mix, b: Mix) -> bool:
    return (a.kind, a.weight, a.box) == (b.kind, b.weight, b.box) and np.array_equal(a.permutation, b.permutation)


def test_draws_are_a_function_of_seed_rank_epoch_and_batch():
    """What makes a resumed run draw what the uninterrupted one drew: no hidden state, nothing to save."""
    first = [draw(batch=b) for b in range(40)]
    assert all(same(a, b) for a, b in zip(first, [draw(batch=b) for b in range(40)]))  # reproducible, in any order
    assert not any(same(a, draw(rank=1, batch=b)) for b, a in enumerate(first))  # each rank its own draws
    assert not any(same(a, draw(epoch=1, batch=b)) for b, a in enumerate(first))
    assert not same(draw(), draw(dataclasses.replace(BOTH, seed=12)))
    kinds = {m.kind for m in first}
    assert kinds == {"mixup", "cutmix"}, kinds  # the switch probability picks both over 40 batches
    assert draw(dataclasses.replace(BOTH, cutmix_alpha=0.0)).kind == "mixup"
    assert {draw(dataclasses.replace(BOTH, mix_switch_prob=1.0), batch=b).kind for b in range(10)} == {"cutmix"}
    assert draw(TrainConfig()) is NO_MIX  # both alphas 0: off


def test_cutmix_pastes_the_partners_box_and_weighs_the_kept_area():
    images = torch.arange(8 * 3 * 32 * 32, dtype=torch.float32).reshape(8, 3, 32, 32)
    labels = torch.arange(8)
    mix = next(m for m in (draw(dataclasses.replace(BOTH, mix_switch_prob=1.0), batch=b) for b in range(20))
               if 0 < m.weight < 1)
    mixed, partner = apply_mix(images, labels, mix)
    top, left, bottom, right = mix.box
    order = torch.as_tensor(mix.permutation)
    assert torch.equal(partner, labels[order])
    assert torch.equal(mixed[:, :, top:bottom, left:right], images[order][:, :, top:bottom, left:right])
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[top:bottom, left:right] = False
    assert torch.equal(mixed[:, :, outside], images[:, :, outside])
    assert mix.weight == pytest.approx(outside.float().mean().item())


def test_mixup_blends_images_by_the_drawn_weight():
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8)
    mix = draw(dataclasses.replace(BOTH, cutmix_alpha=0.0))
    mixed, partner = apply_mix(images, labels, mix)
    order = torch.as_tensor(mix.permutation)
    torch.testing.assert_close(mixed, mix.weight * images + (1 - mix.weight) * images[order])
    assert torch.equal(partner, labels[order])


def soft_target_loss(logits, labels, partner, weight, smoothing):
    """The definition: cross-entropy against weight * smooth(onehot(y)) + (1 - weight) * smooth(onehot(y'))."""
    classes = logits.shape[1]
    smooth = lambda y: F.one_hot(y, classes).float() * (1 - smoothing) + smoothing / classes  # noqa: E731
    target = weight * smooth(labels) + (1 - weight) * smooth(partner)
    return -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()


def test_mixed_loss_is_the_soft_target_cross_entropy_with_label_smoothing():
    logits, labels, partner = torch.randn(8, 5), torch.randint(0, 5, (8,)), torch.randint(0, 5, (8,))
    for weight in (1.0, 0.7, 0.25):
        for smoothing in (0.0, 0.1):
            torch.testing.assert_close(mixed_cross_entropy(logits, labels, partner, weight, smoothing),
                                       soft_target_loss(logits, labels, partner, weight, smoothing))


def test_train_step_mixes_the_batch_and_trains_on_the_soft_target(fresh_accelerate_state):
    """The step's loss and gradient are those of the mixed images against the mixed, smoothed target."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5))
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    mix = draw(dataclasses.replace(BOTH, mix_switch_prob=1.0), batch=1)
    mixed, partner = apply_mix(images, labels, mix)
    expected = soft_target_loss(model(mixed), labels, partner, mix.weight, 0.1)
    (expected_gradient,) = torch.autograd.grad(expected, model[1].weight)

    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = model[1].weight.detach().clone()
    prepared_model, prepared_optimizer = accelerator.prepare(model, optimizer)
    loss = train_step(accelerator, prepared_model, prepared_optimizer, images, labels, 0.1, 0.0, mix)
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(before - model[1].weight.detach(), expected_gradient)  # SGD at lr 1: the update is the gradient
