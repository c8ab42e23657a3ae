"""torch.compile for the models: compiled interaction blocks and a compiled heads training step.

* :func:`compile_blocks` compiles a model's interaction block (``model.interaction``) with dynamic
  shapes and ``fullgraph=True`` (a graph break is an error, not a silent slowdown). It serves
  every model type for inference and for training without second-order derivatives. A forward
  that must be differentiated twice (exact/decoupled training, ``create_graph=True``) runs the
  eager block, because AOTAutograd's compiled backward cannot itself be differentiated.
* :class:`CompiledStep` compiles a whole ``heads`` training step (forward, efsm loss and, through
  AOTAutograd, the backward); the optimiser step stays in eager mode.

Compilation happens at the first call and once more per block index (the block index and
"update the angles" flag are Python constants); after that, batches of any size reuse the graphs.
The fused ops of :mod:`fastchgnet.kernels` are ``torch.library`` ops, so they appear as single
nodes inside the compiled graph (``torch.ops.fastchgnet.*``) instead of breaking it.

Nothing here changes global torch state; compile options are passed per call.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import Tensor, nn

from fastchgnet.model.exact import CHGNet

__all__ = ["CompileCounter", "CompiledStep", "check_first_order", "compile_blocks",
           "compile_callable", "uncompile_blocks"]


class CompileCounter:
    """A torch.compile backend that counts compilations and keeps the FX graphs it is given.

    ``CompileCounter("inductor")`` compiles with Inductor, ``"aot_eager"`` runs AOTAutograd's
    graphs eagerly (fast to compile, for tests), ``"eager"`` runs Dynamo's graph as is.
    ``frame_count`` is the number of (non-empty) graphs compiled so far: one per compilation.
    """

    def __init__(self, backend: str = "inductor") -> None:
        self.backend = backend
        self.graphs: list[torch.fx.GraphModule] = []
        self._ids: list[Any] = []

    @property
    def frame_count(self) -> int:
        return len(self.graphs)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        # Dynamo may restart the analysis of a frame (a new attempt of the same compilation, e.g.
        # to turn symbolic Python floats into tensors) and may hand over empty graphs: neither is
        # a compilation of its own
        if any(n.op == "call_function" for n in gm.graph.nodes):
            cid = torch._guards.CompileContext.current_compile_id()
            key = (cid.frame_id, cid.frame_compile_id) if cid is not None else object()
            if key in self._ids:
                self.graphs[self._ids.index(key)] = gm
            else:
                self._ids.append(key)
                self.graphs.append(gm)
        return torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)

    def op_names(self) -> set[str]:
        """Names of all call targets in the captured graphs (e.g. ``fastchgnet.radial_bases``)."""
        return {str(getattr(n.target, "_name", None) or n.target) for g in self.graphs
                for n in g.graph.nodes if n.op == "call_function"}


class _Scoped:
    """A compiled function called under scoped compiler settings (nothing global changes):

    * ``backed_size_oblivious``: sizes 0 and 1 are not special-cased, so a batch without angles
      (or with one bond) does not force a recompilation;
    * ``specialize_float``: Python floats (LayerNorm eps, cutoffs) are constants, which spares
      Dynamo a second analysis of every frame.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from torch.fx.experimental import _config as fx_config

        # each setting only where this torch has it (older versions compile without it)
        with _patch(fx_config, backed_size_oblivious=True), \
                _patch(torch._dynamo.config, specialize_float=True):
            return self.fn(*args, **kwargs)


def _patch(config: Any, **settings: Any) -> Any:
    """``config.patch(**settings)`` restricted to the settings ``config`` knows."""
    known = {k: v for k, v in settings.items() if hasattr(config, k)}
    return config.patch(**known) if known else contextlib.nullcontext()


def compile_callable(fn: Callable, *, backend: str | Callable = "inductor", dynamic: bool | None = True,
                     fullgraph: bool = True, mode: str | None = None,
                     options: dict[str, Any] | None = None) -> Callable:
    """``torch.compile(fn, ...)`` called under this module's scoped settings (see
    :class:`_Scoped`). ``fullgraph=False`` is needed to compile a DDP module, whose graph Dynamo
    splits at the gradient buckets."""
    return _Scoped(torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=fullgraph,
                                 mode=mode, options=options))


def check_first_order(model: nn.Module, what: str = "a compiled training step") -> None:
    """Raise a ValueError naming the model type unless its forces and stress come from heads."""
    if getattr(model, "forces_by_autograd", True):
        raise ValueError(
            f"{what} needs a model with force/stress heads (model_type 'heads', --model heads); "
            f"{getattr(model, 'model_type', type(model).__name__)!r} takes forces as energy "
            "derivatives, whose training needs second-order gradients that compiled graphs do "
            "not support: train it eagerly, or use compile_blocks for inference")


def compile_blocks(model: CHGNet, *, backend: str | Callable = "inductor", dynamic: bool = True,
                   fullgraph: bool = True, mode: str | None = None,
                   options: dict[str, Any] | None = None) -> CHGNet:
    """Compile the interaction blocks of ``model`` in place (see the module docstring); returns
    the model. :func:`uncompile_blocks` undoes it. Checkpoints are unaffected."""
    model._compiled_interaction = compile_callable(
        model.interaction, backend=backend, dynamic=dynamic, fullgraph=fullgraph, mode=mode,
        options=options)
    return model


def uncompile_blocks(model: CHGNet) -> CHGNet:
    """Back to the eager interaction blocks."""
    model._compiled_interaction = None
    return model


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
