"""Learning rate, optimizer and learning-rate schedule for training.

* :func:`default_lr` — the learning rate scaled linearly with the batch size (paper Eq. 14), the
  default when training from scratch; :data:`FINETUNE_LR`, the default when fine-tuning;
* :func:`make_optimizer` — Adam over the trainable parameters;
* :func:`make_scheduler` — cosine annealing to a fraction of the initial rate, optionally after a
  linear warm-up, stepped once per optimizer step; optionally a constant rate from a given step on
  (the trainer's stage two). Its state (step count and schedule parameters)
  round-trips through ``state_dict`` / ``load_state_dict`` so that a resumed run continues with
  the same learning rates.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["FINETUNE_LR", "WarmupCosine", "default_lr", "make_optimizer", "make_scheduler"]

#: learning rate of a fine-tuning run (``init`` given, no ``lr``): chgnet's Trainer default. Eq. 14
#: at a small fine-tuning batch (1.9e-5 at 8) barely moves pretrained weights in a few epochs.
FINETUNE_LR = 1e-3


def default_lr(batch_size: int, base_lr: float = 3e-4, base_batch: int = 128) -> float:
    """Learning rate for ``batch_size``: ``batch_size / base_batch * base_lr`` (paper Eq. 14,
    3e-4 at a batch of 128)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if base_batch < 1 or not base_lr > 0:
        raise ValueError(f"invalid base: base_lr={base_lr}, base_batch={base_batch}")
    return batch_size / base_batch * base_lr


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam over the parameters of ``model`` that require gradients (fixed ones such as the
    AtomRef are left out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


class WarmupCosine:
    """Learning-rate factor of step ``t``: linear warm-up, then cosine decay to ``min_lr_ratio``.

    * ``t < warmup_steps``: ``(t + 1) / warmup_steps`` (the last warm-up step reaches 1);
    * ``warmup_steps <= t <= total_steps``: ``r + (1 - r) * (1 + cos(pi * p)) / 2`` with
      ``p = (t - warmup_steps) / (total_steps - warmup_steps)``, from 1 down to ``r``;
    * after ``total_steps``: ``r``;
    * with ``const_from`` set, from step ``const_from`` on: ``const_ratio`` (a constant rate, as in
      the second stage of MACE's training).

    A plain object (not a lambda), so :class:`~torch.optim.lr_scheduler.LambdaLR` saves its
    parameters in ``state_dict``.
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.01,
                 const_from: int | None = None, const_ratio: float = 1.0) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], "
                             f"got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if const_from is not None and const_from < 0:
            raise ValueError(f"const_from must be >= 0, got {const_from}")
        if not const_ratio > 0:
            raise ValueError(f"const_ratio must be positive, got {const_ratio}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_lr_ratio = float(min_lr_ratio)
        self.const_from = None if const_from is None else int(const_from)
        self.const_ratio = float(const_ratio)

    def __call__(self, step: int) -> float:
        w, n, r = self.warmup_steps, self.total_steps, self.min_lr_ratio
        if self.const_from is not None and step >= self.const_from:
            return self.const_ratio
        if step < w:
            return (step + 1) / w
        if n == w:
            return r
        p = min(1.0, (step - w) / (n - w))
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * p))

    def __repr__(self) -> str:
        const = (f", const_from={self.const_from}, const_ratio={self.const_ratio}"
                 if self.const_from is not None else "")
        return (f"WarmupCosine(total_steps={self.total_steps}, warmup_steps={self.warmup_steps}, "
                f"min_lr_ratio={self.min_lr_ratio}{const})")


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                   min_lr_ratio: float = 0.01, const_from: int | None = None,
                   const_ratio: float = 1.0) -> LambdaLR:
    """Cosine annealing from the optimizer's learning rate to ``min_lr_ratio`` times it over
    ``total_steps`` optimizer steps, after ``warmup_steps`` steps of linear warm-up; from step
    ``const_from`` on (when given), ``const_ratio`` times the initial rate.

    Call ``scheduler.step()`` after every ``optimizer.step()``. To resume, rebuild the optimizer
    and scheduler the same way and load both ``state_dict``\\ s.
    """
    return LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, min_lr_ratio, const_from,
                                            const_ratio))
