"""ASE-side inference: calculator, relaxation, molecular dynamics.

``CHGNetCalculator`` (ASE calculator of any fastchgnet model), ``StructOptimizer`` /
``relax_structure`` (FIRE/BFGS with ``FrechetCellFilter``) and ``MolecularDynamics`` (NVE, NVT,
NPT with ASE's integrators). For convenience this namespace also re-exports the torch-native
batched simulator of :mod:`fastchgnet.sim` (``BatchedMD``, ``BatchPotential``) and the compiled,
CUDA-graph and exported inference of :mod:`fastchgnet.compile` (``CompiledForward``,
``CUDAGraphForward``, ``save_exported``, ``load_exported``). ``RelaxResult`` (defined in
:mod:`fastchgnet.sim.result`) is what both relaxers return. Submodules are imported on first use,
so ``import fastchgnet.md`` stays light.

These classes keep fastchgnet's own arguments and defaults, take a ``chgnet`` ``CHGNet`` object as
a model, and reject unknown keywords (chgnet's names get a message naming ours, see
:mod:`fastchgnet.md.options`). :mod:`fastchgnet.compat.chgnet` has chgnet's classes, arguments
and defaults on the same calculator.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CHGNetCalculator": "fastchgnet.md.calculator",
    "make_calculator": "fastchgnet.md.calculator",
    "MolecularDynamics": "fastchgnet.md.dynamics",
    "estimate_bulk_modulus": "fastchgnet.md.dynamics",
    "RelaxResult": "fastchgnet.sim.result",
    "StructOptimizer": "fastchgnet.md.relax",
    "relax_structure": "fastchgnet.md.relax",
    # batched simulation and compiled / exported inference
    "BatchedMD": "fastchgnet.sim.dynamics",
    "BatchPotential": "fastchgnet.sim.potential",
    "CompiledForward": "fastchgnet.compile.forward",
    "CUDAGraphForward": "fastchgnet.compile.forward",
    "load_exported": "fastchgnet.compile.export",
    "save_exported": "fastchgnet.compile.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fastchgnet.md' has no attribute {name!r}")
