"""Batched simulation: many structures relaxed or simulated at once, in one batch on the device.

* :class:`BatchPotential` (:mod:`~fastchgnet.sim.potential`) — energies, forces and stresses of
  a :class:`~fastchgnet.data.device_graph.GraphInputs` system; graphs on the device with a Verlet
  skin; ``forward=`` takes a compiled forward of :mod:`fastchgnet.compile`.
* :func:`relax` (:mod:`~fastchgnet.sim.fire`) — FIRE (the ASE algorithm and defaults, one set of
  FIRE variables per structure) with an optional unit-cell filter (ASE's ``UnitCellFilter``
  equations), with **in-flight batching**: converged structures leave the batch and waiting ones
  enter, so the batch stays full. Returns one :class:`RelaxResult` per structure (the class the
  ASE relaxer of :mod:`fastchgnet.md` returns too).
* :class:`BatchedMD` (:mod:`~fastchgnet.sim.dynamics`) — NVE (velocity Verlet) and NVT Langevin
  (BAOAB) on a batch.

Units: positions Å, time fs, velocities Å/fs, masses amu, energies eV, forces eV/Å, stress GPa
(positive = tensile), temperatures K. The model's energy per atom is multiplied by the number of
atoms: energies here are totals per structure. This package is torch-native; it does not use
ASE's dynamics (ASE-driven relaxation and MD are in :mod:`fastchgnet.md`).
"""

from fastchgnet.sim.dynamics import BatchedMD
from fastchgnet.sim.potential import (BatchPotential, atom_graph_of, atomic_masses, concat_systems,
                                      select_graphs, structure_from_arrays)
from fastchgnet.sim.fire import FIREParams, relax
from fastchgnet.sim.result import RelaxResult

__all__ = ["BatchPotential", "BatchedMD", "FIREParams", "RelaxResult", "atom_graph_of",
           "atomic_masses", "concat_systems", "relax", "select_graphs", "structure_from_arrays"]
