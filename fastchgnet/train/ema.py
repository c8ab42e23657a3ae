"""Exponential moving average (EMA) of a model's trainable parameters.

The averaged weights are what MACE (``--ema``) and nequip (``ema_decay``) validate and ship: they
smooth the noise of the last optimiser steps. The trainer keeps the raw weights for training and
for ``last.pt`` (an exact resume needs them) and swaps the averaged ones in to validate and to write
``best.pt``.

The update after optimiser step ``n`` (counted from 1) is::

    rate = min(decay, (1 + n) / (10 + n))
    shadow = rate * shadow + (1 - rate) * param

The warm-up term lets a short run average over the steps it has instead of dragging the
initial weights along. One fused ``_foreach_lerp_`` per step, on the device, no host sync.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """Moving average of the parameters of ``model`` that require gradients (frozen ones are the
    same in both copies). Buffers are not averaged."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().clone() for p in self.params]
        self.num_updates = 0

    def rate(self) -> float:
        """The decay the next update uses."""
        n = self.num_updates + 1
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current parameters into the average (call after every optimiser step)."""
        weight = 1.0 - self.rate()
        self.num_updates += 1
        if self.shadow:
            torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], weight)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; the raw ones come back after."""
        with torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
            torch._foreach_copy_([p.data for p in self.params], self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], backup)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "names": list(self.names),
                "shadow": [t.detach().cpu() for t in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = list(state["names"])
        if names != self.names:
            missing = sorted(set(self.names) - set(names))
            extra = sorted(set(names) - set(self.names))
            raise ValueError(f"EMA state does not match the model's trainable parameters "
                             f"(missing {missing[:5]}, unexpected {extra[:5]})")
        shadow: list[Tensor] = state["shadow"]
        with torch.no_grad():
            for mine, saved, name in zip(self.shadow, shadow, names):
                if mine.shape != saved.shape:
                    raise ValueError(f"EMA state of {name}: shape {tuple(saved.shape)}, model has "
                                     f"{tuple(mine.shape)}")
                mine.copy_(saved)
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
