"""A compiled training step of a ``heads`` model (forward, loss and AOTAutograd's backward)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from fastchgnet.compile.settings import check_first_order, compile_callable

__all__ = ["CompiledStep"]


class CompiledStep:
    """A compiled training step of a ``heads`` model: ``step(batch, targets) -> loss``.

    The forward pass and the loss are one compiled graph (dynamic shapes, no graph break); its
    backward is compiled by AOTAutograd; then gradient clipping and the optimiser step run eagerly.
    Only models whose forces and stress need no second derivative can be compiled this way
    (``model.forces_by_autograd`` must be False).

    Args:
        model, loss_fn, optimizer: the model, an :class:`~fastchgnet.train.loss.EFSMLoss`-like
            module ``loss_fn(pred, targets, batch) -> (loss, parts)`` and the optimiser.
        scheduler: optional lr scheduler, stepped after the optimiser.
        grad_clip: optional max gradient norm.
        backend, dynamic, mode: passed to ``torch.compile`` (``fullgraph`` is always on).
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, *,
                 scheduler: Any = None, grad_clip: float | None = None,
                 backend: str | Callable = "inductor", dynamic: bool = True,
                 mode: str | None = None, task: str = "efsm") -> None:
        check_first_order(model, "CompiledStep")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.scheduler, self.grad_clip, self.task = scheduler, grad_clip, task
        self._forward = compile_callable(self._loss, backend=backend, dynamic=dynamic, mode=mode)

    def _loss(self, batch: Any, targets: Any) -> tuple[Tensor, dict[str, Tensor]]:
        pred = self.model(batch, task=self.task)
        return self.loss_fn(pred, targets, batch)

    def loss(self, batch: Any, targets: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The compiled forward and loss only (no backward, no update)."""
        return self._forward(batch, targets)

    def __call__(self, batch: Any, targets: Any) -> Tensor:
        self.model.train()
        loss, _ = self._forward(batch, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss.detach()
