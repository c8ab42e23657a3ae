"""fastchgnet: fast CHGNet-class universal interatomic potentials.

Quick use::

    import fastchgnet
    model = fastchgnet.load_model("0.3.0")           # CHGNet 0.3.0 weights, exact model
    pred = model.predict(structure, task="efsm")     # e (eV/atom), f (eV/Å), s (GPa), m (μB)
"""

from fastchgnet.data import Batch, CrystalGraph, build_graph, build_graphs, collate
from fastchgnet.model import (CHGNet, CHGNetConfig, DecoupledCHGNet, HeadsCHGNet, load_model, predict,
                              save_checkpoint)

__version__ = "0.1.0"

# inference helpers (ASE calculator, relaxation, MD): imported on first use, so that
# ``import fastchgnet`` does not import ASE
_MD_EXPORTS = ("CHGNetCalculator", "MolecularDynamics", "StructOptimizer", "relax_structure")


def __getattr__(name: str):
    if name in _MD_EXPORTS:
        import fastchgnet.md

        return getattr(fastchgnet.md, name)
    raise AttributeError(f"module 'fastchgnet' has no attribute {name!r}")


__all__ = [
    "Batch",
    "CHGNet",
    "CHGNetCalculator",
    "CHGNetConfig",
    "CrystalGraph",
    "DecoupledCHGNet",
    "HeadsCHGNet",
    "MolecularDynamics",
    "StructOptimizer",
    "build_graph",
    "build_graphs",
    "collate",
    "load_model",
    "predict",
    "relax_structure",
    "save_checkpoint",
]
