"""Structures to crystal graphs, and graphs to batches."""

from fastchgnet.data.batch import Batch, collate, split_by_size
from fastchgnet.data.graph import CrystalGraph, build_graph, build_graphs

__all__ = ["Batch", "CrystalGraph", "build_graph", "build_graphs", "collate", "split_by_size"]
