"""Compiled interaction blocks (inference, and training without second-order derivatives).

:func:`compile_blocks` compiles a model's interaction block (``model.interaction``) with dynamic
shapes and ``fullgraph=True`` (a graph break is an error, not a silent slowdown). It serves every
model type for inference and for training without second-order derivatives. A forward that must
be differentiated twice (exact/decoupled training, ``create_graph=True``) runs the eager block,
because AOTAutograd's compiled backward cannot itself be differentiated.

Compilation happens at the first call and once more per block index (the block index and
"update the angles" flag are Python constants); after that, batches of any size reuse the graphs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from fastchgnet.compile.settings import compile_callable

if TYPE_CHECKING:  # annotations only: fastchgnet.compile does not import the models
    from fastchgnet.model.exact import CHGNet

__all__ = ["compile_blocks", "uncompile_blocks"]


def compile_blocks(model: CHGNet, *, backend: str | Callable = "inductor", dynamic: bool = True,
                   fullgraph: bool = True, mode: str | None = None,
                   options: dict[str, Any] | None = None) -> CHGNet:
    """Compile the interaction blocks of ``model`` in place (see the module docstring); returns
    the model. It sets ``model.compiled_block``, which the backbone runs instead of its eager
    block; :func:`uncompile_blocks` undoes it. Checkpoints are unaffected."""
    model.compiled_block = compile_callable(
        model.interaction, backend=backend, dynamic=dynamic, fullgraph=fullgraph, mode=mode,
        options=options)
    return model


def uncompile_blocks(model: CHGNet) -> CHGNet:
    """Back to the eager interaction blocks."""
    model.compiled_block = None
    return model
