"""fastchgnet: fast CHGNet-class universal interatomic potentials.

Quick use::

    import fastchgnet
    model = fastchgnet.load_model("0.3.0")           # CHGNet 0.3.0 weights, exact model
    pred = model.predict(structure, task="efsm")     # e (eV/atom), f (eV/Å), s (GPa), m (μB)
"""

from fastchgnet.data import Batch, CrystalGraph, build_graph, build_graphs, collate
from fastchgnet.model import CHGNet, CHGNetConfig, DecoupledCHGNet, load_model, predict, save_checkpoint

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "CHGNet",
    "CHGNetConfig",
    "CrystalGraph",
    "DecoupledCHGNet",
    "build_graph",
    "build_graphs",
    "collate",
    "load_model",
    "predict",
    "save_checkpoint",
]
