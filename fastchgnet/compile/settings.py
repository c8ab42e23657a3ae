"""The one way fastchgnet calls ``torch.compile``: :func:`compile_callable` (scoped settings, nothing
global changes), plus :class:`CompileCounter` (a counting backend for tests and benchmarks) and
:func:`check_first_order` (which models a compiled training step can serve)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn
from torch.fx.experimental import _config as fx_config

from fastchgnet.compile.lowering import gemm_pass, register_gemm_lowering
from fastchgnet.nn.linear import onednn_preferred

__all__ = ["CompileCounter", "check_first_order", "compile_callable"]


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
      Dynamo a second analysis of every frame;
    * ``use_duck_shape=False``: two sizes that happen to be equal in the first batch (e.g. 32
      angle rows and a feature width of 32) are not assumed equal, which would force a
      recompilation at the next batch.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # each setting only where this torch has it (older versions compile without it)
        with _patch(fx_config, backed_size_oblivious=True, use_duck_shape=False), \
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
    splits at the gradient buckets. Inductor compiles our CPU matrix product by its size
    (:func:`~fastchgnet.compile.lowering.register_gemm_lowering`)."""
    if not isinstance(backend, str) or backend == "inductor":  # (a callable may wrap Inductor)
        register_gemm_lowering()
    if backend == "inductor" and onednn_preferred() and mode is None:
        products = gemm_pass()
        if products is not None and "post_grad_custom_post_pass" not in (options or {}):
            options = {**(options or {}), "post_grad_custom_post_pass": products}
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
