"""The reference's AdamW parameter groups and ``LinearWarmupCosineLRScheduler``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from model.training.optim import LinearWarmupCosineLR, build_optimizer, param_groups


def test_train_scheduler_matches_the_reference_formulas():
    # stage 2: warmup 1e-6 → 3e-5 over 200 steps, cosine 3e-5 → 1e-5 over 5 × 200
    s = LinearWarmupCosineLR(
        max_epoch=5, iters_per_epoch=200, init_lr=3e-5, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=200
    )
    assert s.lr(0) == pytest.approx(1e-6)  # the runner sets the schedule before the first iteration
    assert s.lr(1) == pytest.approx(1e-6 + (3e-5 - 1e-6) / 200)
    assert s.lr(199) == pytest.approx(1e-6 + (3e-5 - 1e-6) * 199 / 200)
    assert s.lr(200) == pytest.approx((3e-5 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 200 / 1000)) + 1e-5)
    assert s.lr(500) == pytest.approx(2e-5)
    assert s.lr(999) == pytest.approx(1e-5, abs=1e-9)
    # no warmup: straight into the cosine, first step at init_lr
    assert LinearWarmupCosineLR(2, 10, 1e-4, 8e-5).lr(0) == pytest.approx(1e-4)


def test_train_scheduler_warmup_uses_the_step_within_the_epoch():
    """The reference passes ``cur_step`` (not the global step) to the warmup: it restarts each epoch."""
    s = LinearWarmupCosineLR(max_epoch=4, iters_per_epoch=10, init_lr=1e-3, min_lr=0.0, warmup_lr=0.0, warmup_steps=25)
    assert s.lr(5) == pytest.approx(1e-3 * 5 / 25)
    assert s.lr(12) == pytest.approx(1e-3 * 2 / 25)  # epoch 1, step 2
    assert s.lr(25) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 25 / 40)))


def test_train_param_groups_decay_only_matrices():
    proj = nn.Linear(4, 3)
    norm = nn.LayerNorm(3)
    lora = nn.Parameter(torch.zeros(2, 4))
    frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)
    named = [
        ("llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", lora),
        ("llama_proj.weight", proj.weight),
        ("llama_proj.bias", proj.bias),
        ("some_norm.weight", norm.weight),
        ("frozen.weight", frozen),
    ]
    decay, no_decay = param_groups(named, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(lora), id(proj.weight)]
    assert [id(p) for p in no_decay["params"]] == [id(proj.bias), id(norm.weight)]
    optimizer = build_optimizer(named, init_lr=3e-5, weight_decay=0.05)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8
