"""The reference's optimizer and learning-rate schedule (``runner_base.RunnerBase.optimizer``, ``common/optims.py``).

* AdamW, ``betas = (0.9, beta2 = 0.999)``, ``eps = 1e-8``; two parameter groups in the reference's order:
  weight decay for parameters with ≥ 2 dims whose name has no ``bias``/``ln``/``bn``, none for the rest
  (biases, norms).  Names are the reference's (``llama_proj.weight``,
  ``llama_model.base_model.model.….lora_A.weight``), parameters in the reference's module order
  (the LLM's LoRA first, then ``llama_proj``), so the optimizer state lines up with the reference's.
* ``LinearWarmupCosineLRScheduler``: the runner calls ``step(cur_epoch, cur_step)`` **before** every
  iteration, so the very first iteration already runs at ``warmup_lr`` (not ``init_lr``).  While
  ``epoch × iters_per_epoch + cur_step < warmup_steps`` the rate is
  ``min(init_lr, warmup_lr + (init_lr − warmup_lr) × cur_step / max(warmup_steps, 1))`` — note ``cur_step``,
  the step *within the epoch*, as the reference has it — afterwards
  ``(init_lr − min_lr) × ½ (1 + cos(π t / (max_epoch × iters_per_epoch))) + min_lr`` with ``t`` the global step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LinearWarmupCosineLR", "build_optimizer", "param_groups", "uses_weight_decay"]


def uses_weight_decay(name: str, param: torch.Tensor) -> bool:
    """The reference's rule: ``not (p.ndim < 2 or "bias" in n or "ln" in n or "bn" in n)``."""
    return not (param.ndim < 2 or "bias" in name or "ln" in name or "bn" in name)


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """``[{"params": decayed, "weight_decay": wd}, {"params": the rest, "weight_decay": 0}]`` (trainable only)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in named:
        if not param.requires_grad:
            continue
        (decay if uses_weight_decay(name, param) else no_decay).append(param)
    return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    named: Iterable[tuple[str, nn.Parameter]], *, init_lr: float, weight_decay: float, beta2: float = 0.999
) -> torch.optim.AdamW:
    """``torch.optim.AdamW(param_groups, lr=init_lr, weight_decay=wd, betas=(0.9, beta2))`` as the runner makes it."""
    return torch.optim.AdamW(
        param_groups(named, weight_decay), lr=float(init_lr), weight_decay=float(weight_decay), betas=(0.9, beta2)
    )


@dataclass(frozen=True)
class LinearWarmupCosineLR:
    """The reference scheduler as a pure function of the iteration (nothing to save for resuming)."""

    max_epoch: int
    iters_per_epoch: int
    init_lr: float
    min_lr: float
    warmup_lr: float = -1.0  # < 0: warmup starts at init_lr (warmup_start_lr default)
    warmup_steps: int = 0

    def lr(self, iteration: int) -> float:
        """Learning rate of global iteration ``iteration`` (0-based)."""
        cur_epoch, cur_step = divmod(iteration, self.iters_per_epoch)
        total_cur_step = cur_epoch * self.iters_per_epoch + cur_step
        start = self.warmup_lr if self.warmup_lr >= 0 else self.init_lr
        if total_cur_step < self.warmup_steps:
            return min(self.init_lr, start + (self.init_lr - start) * cur_step / max(self.warmup_steps, 1))
        max_t = self.max_epoch * self.iters_per_epoch
        return (self.init_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * total_cur_step / max_t)) + self.min_lr

    def step(self, optimizer: torch.optim.Optimizer, iteration: int) -> float:
        """Set every group's ``lr`` for this iteration (the reference sets all groups alike) and return it."""
        lr = self.lr(iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
