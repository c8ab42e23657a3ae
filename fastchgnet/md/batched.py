"""Deprecated: the batched simulator moved to :mod:`fastchgnet.sim` (``BatchPotential``,
``relax``, ``BatchedMD``, ``RelaxResult``); unit constants are in :mod:`fastchgnet.units`.
This module re-exports them and will be removed in 0.2."""

from __future__ import annotations

import warnings

from fastchgnet.nn.scatter import segment_sum as _scatter_sum
from fastchgnet.sim.dynamics import BatchedMD
from fastchgnet.sim.potential import (BatchPotential, atom_graph_of, atomic_masses, concat_systems,
                                      select_graphs, structure_from_arrays)
from fastchgnet.sim.fire import FIREParams, _collect, _fire_step, _Frame, _RelaxState, relax
from fastchgnet.sim.result import RelaxResult
from fastchgnet.units import AMU_A2_FS2_EV, EV_A3_TO_GPA, KB_EV

warnings.warn("fastchgnet.md.batched moved to fastchgnet.sim / fastchgnet.compile; "
              "will be removed in 0.2", DeprecationWarning, stacklevel=2)

__all__ = ["AMU_A2_FS2_EV", "BatchPotential", "BatchedMD", "EV_A3_TO_GPA", "FIREParams", "KB_EV",
           "RelaxResult", "_Frame", "_RelaxState", "_collect", "_fire_step", "_scatter_sum",
           "atom_graph_of", "atomic_masses", "concat_systems", "relax", "select_graphs",
           "structure_from_arrays"]
