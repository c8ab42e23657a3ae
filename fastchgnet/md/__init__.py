"""Inference: ASE calculator, relaxation, molecular dynamics.

``CHGNetCalculator`` (ASE calculator of any fastchgnet model), ``StructOptimizer`` / ``relax``
(FIRE/BFGS with ``FrechetCellFilter``) and ``MolecularDynamics`` (NVE, NVT, NPT); batched
relaxation and MD on many structures at once (``fastchgnet.md.batched.relax``, ``BatchedMD``); compiled, CUDA-graph and
exported inference (``CompiledForward``, ``CUDAGraphForward``, ``save_exported``,
``load_exported``). Submodules are imported on first use, so ``import fastchgnet.md`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CHGNetCalculator": "fastchgnet.md.calculator",
    "make_calculator": "fastchgnet.md.calculator",
    "MolecularDynamics": "fastchgnet.md.dynamics",
    "estimate_bulk_modulus": "fastchgnet.md.dynamics",
    "RelaxResult": "fastchgnet.md.relax",
    "StructOptimizer": "fastchgnet.md.relax",
    "relax_structure": "fastchgnet.md.relax",
    # batched simulation and compiled / exported inference
    "BatchedMD": "fastchgnet.md.batched",
    "BatchPotential": "fastchgnet.md.batched",
    "CompiledForward": "fastchgnet.md.compiled",
    "CUDAGraphForward": "fastchgnet.md.compiled",
    "load_exported": "fastchgnet.md.compiled",
    "save_exported": "fastchgnet.md.compiled",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fastchgnet.md' has no attribute {name!r}")
