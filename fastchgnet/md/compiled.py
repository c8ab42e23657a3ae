"""Deprecated: compiled, CUDA-graph and exported inference moved to :mod:`fastchgnet.compile`
(``CompiledForward``, ``CUDAGraphForward``, ``save_exported``, ``load_exported``...); the output
key groups ``PER_GRAPH`` / ``PER_ATOM`` are in :mod:`fastchgnet.keys`. This module re-exports
them and will be removed in 0.2."""

from __future__ import annotations

import warnings

from fastchgnet.compile.export import (ExportedModel, FlatModel, _dynamic_shapes, _needs_grad,
                                       _torch_kernels, export_model, is_aoti_package, load_exported,
                                       save_exported)
from fastchgnet.compile.forward import (BATCH_FIELDS, CompiledForward, CUDAGraphForward,
                                        _trace_autograd, batch_args, bucket, inference_outputs,
                                        pad_batch, unpad)
from fastchgnet.compile.settings import compile_callable
from fastchgnet.keys import PER_ATOM, PER_GRAPH

warnings.warn("fastchgnet.md.compiled moved to fastchgnet.sim / fastchgnet.compile; "
              "will be removed in 0.2", DeprecationWarning, stacklevel=2)

__all__ = ["BATCH_FIELDS", "CUDAGraphForward", "CompiledForward", "ExportedModel", "FlatModel",
           "PER_ATOM", "PER_GRAPH", "_dynamic_shapes", "_needs_grad", "_torch_kernels",
           "_trace_autograd", "batch_args", "bucket", "compile_callable", "export_model",
           "inference_outputs", "is_aoti_package", "load_exported", "pad_batch", "save_exported",
           "unpad"]
