"""Compilation and export of fastchgnet models, in one place.

Every entry point is built on :func:`compile_callable` (``torch.compile`` under scoped settings:
no recompilation for batches without angles, Python floats as constants, nothing global changed).
Which one to use:

* **Inference** (ASE calculator, batched simulation): :class:`CompiledForward` compiles the whole
  inference forward (energy, and forces/stress by autograd or by the heads) with dynamic shapes;
  :class:`CUDAGraphForward` pads bonds and angles to size buckets (:func:`pad_batch`,
  :func:`bucket`) and replays one CUDA graph per bucket. Both are ``forward(batch, task)``
  callables: pass them as ``forward=`` to ``CHGNetCalculator`` or ``fastchgnet.sim.BatchPotential``.
* **Training**: :class:`CompiledStep` compiles a whole training step (forward, loss, backward) of a
  ``heads`` model (:func:`check_first_order` says which models qualify); :func:`compile_blocks`
  compiles a model's interaction blocks in place for any model type (undone by
  :func:`uncompile_blocks`); the eager block serves second-order training.
* **Deployment**: :func:`save_exported` writes the inference forward as a ``torch.export`` program
  or an AOTInductor ``.pt2`` package that runs without fastchgnet; :func:`load_exported` loads
  either kind as an :class:`ExportedModel` (``export_model`` gives the program itself).

:class:`CompileCounter` is a counting backend for tests and benchmarks. The fused ops of
:mod:`fastchgnet.kernels` are ``torch.library`` ops, so they appear as single nodes inside a
compiled graph (``torch.ops.fastchgnet.*``) instead of breaking it; exports trace their plain-torch
reference instead, so the program holds aten ops only.

Modules: :mod:`~fastchgnet.compile.settings`, :mod:`~fastchgnet.compile.blocks`,
:mod:`~fastchgnet.compile.step`, :mod:`~fastchgnet.compile.forward`,
:mod:`~fastchgnet.compile.export`.
"""

from fastchgnet.compile.blocks import compile_blocks, uncompile_blocks
from fastchgnet.compile.export import (ExportedModel, FlatModel, export_model, is_aoti_package,
                                       load_exported, save_exported)
from fastchgnet.compile.forward import (BATCH_FIELDS, CompiledForward, CUDAGraphForward, batch_args,
                                        bucket, inference_outputs, pad_batch, unpad)
from fastchgnet.compile.settings import CompileCounter, check_first_order, compile_callable
from fastchgnet.compile.step import CompiledStep

__all__ = [
    "BATCH_FIELDS",
    "CUDAGraphForward",
    "CompileCounter",
    "CompiledForward",
    "CompiledStep",
    "ExportedModel",
    "FlatModel",
    "batch_args",
    "bucket",
    "check_first_order",
    "compile_blocks",
    "compile_callable",
    "export_model",
    "inference_outputs",
    "is_aoti_package",
    "load_exported",
    "pad_batch",
    "save_exported",
    "uncompile_blocks",
    "unpad",
]
