"""Structures to crystal graphs, and graphs to batches."""

from fastchgnet.data.batch import Batch, collate, split_by_size
from fastchgnet.data.graph import CrystalGraph, build_graph, build_graphs
from fastchgnet.data.readers import Sample, read_dataset

__all__ = ["Batch", "CrystalGraph", "Sample", "build_graph", "build_graphs", "collate", "read_dataset",
           "split_by_size"]
