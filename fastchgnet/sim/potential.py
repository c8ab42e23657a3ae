"""The potential of a batch of structures, and the system helpers of the batched simulators.

:class:`BatchPotential` gives energies, forces and stresses of a
:class:`~fastchgnet.data.device_graph.GraphInputs` system, with graphs built on the device with a
Verlet skin. The helpers select and concatenate systems (structures leaving or entering a batch),
map atoms to their structure, look up masses and turn arrays back into structures.

Units: positions Å, masses amu, energies eV (totals per structure), forces eV/Å, stress GPa
(positive = tensile).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from fastchgnet.data.device_graph import GraphInputs, VerletGraph, graph_inputs
from fastchgnet.keys import ENERGY, FORCES, STRESS

__all__ = ["BatchPotential", "atom_graph_of", "atomic_masses", "concat_systems", "select_graphs",
           "structure_from_arrays"]


def atom_graph_of(n_atoms: Tensor, n_total: int) -> Tensor:
    """(n_atoms_total,) structure index of each atom."""
    return torch.repeat_interleave(torch.arange(n_atoms.shape[0], device=n_atoms.device), n_atoms,
                                   output_size=n_total)


def atomic_masses(numbers: Tensor) -> Tensor:
    """Masses (amu) of atomic numbers, from ASE's table."""
    from ase.data import atomic_masses as table  # ASE only where masses are needed

    return torch.as_tensor(table, dtype=torch.float64, device=numbers.device).index_select(0, numbers)


# ------------------------------------------------------------------------------------------------
# systems: selection and concatenation (used when structures enter or leave the batch)


def select_graphs(gi: GraphInputs, keep: Tensor) -> tuple[GraphInputs, Tensor]:
    """The structures with ``keep`` True (a (n_graphs,) bool), and the atom mask."""
    ag = atom_graph_of(gi.n_atoms, gi.positions.shape[0])
    atoms = keep.index_select(0, ag)
    return GraphInputs(gi.atomic_numbers[atoms], gi.positions[atoms], gi.lattice[keep],
                       gi.n_atoms[keep], gi.pbc[keep]), atoms


def concat_systems(parts: Sequence[GraphInputs]) -> GraphInputs:
    """The structures of ``parts``, in order, as one system."""
    return GraphInputs(*(torch.cat([getattr(p, f) for p in parts]) for f in
                         ("atomic_numbers", "positions", "lattice", "n_atoms", "pbc")))


def structure_from_arrays(template: Any, positions: np.ndarray, lattice: np.ndarray) -> Any:
    """A copy of ``template`` (pymatgen Structure or ASE Atoms) with new positions and cell."""
    if hasattr(template, "get_positions"):
        atoms = template.copy()
        atoms.set_cell(lattice, scale_atoms=False)
        atoms.set_positions(positions)
        return atoms
    from pymatgen.core import Lattice, Structure  # pymatgen only for pymatgen inputs

    return Structure(Lattice(lattice, pbc=template.lattice.pbc), template.species, positions,
                     coords_are_cartesian=True, site_properties=template.site_properties or None)


# ------------------------------------------------------------------------------------------------
# potential


class BatchPotential:
    """Energies (eV, per structure), forces (eV/Å) and stresses (GPa) of a batch of structures.

    Args:
        model: a fastchgnet model (exact, decoupled or heads), in eval mode.
        skin: Verlet skin (Å) of the device neighbour list.
        forward: optional replacement of ``model(batch, task=...)``, e.g. a compiled forward from
            :mod:`fastchgnet.compile`; called as ``forward(batch, task)``.
    """

    def __init__(self, model: torch.nn.Module, *, skin: float = 1.0,
                 forward: Callable[..., dict[str, Tensor]] | None = None, **graph_kwargs: Any):
        self.model = model.eval()
        self.verlet = VerletGraph.for_model(model, skin, **graph_kwargs)
        self.forward = forward
        self.n_calls = 0

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(self, gi: GraphInputs, stress: bool = True) -> dict[str, Tensor]:
        batch = self.verlet.update(gi.atomic_numbers, gi.positions, gi.lattice, gi.n_atoms, gi.pbc)
        task = "efs" if stress else "ef"
        if self.forward is not None:
            out = self.forward(batch, task)
        else:
            out = self.model(batch, task=task, create_graph=False)
        self.n_calls += 1
        n = gi.n_atoms.to(out[ENERGY].dtype)
        e = out[ENERGY] * n if self.model.config.is_intensive else out[ENERGY]  # type: ignore[union-attr]
        res = {"energy": e.detach(), "forces": out[FORCES].detach()}
        if stress:
            res["stress"] = out[STRESS].detach()
        return res

    def system(self, structures: Sequence[Any]) -> GraphInputs:
        """Structures as a system on the model's device and dtype."""
        return graph_inputs(structures, self.device, self.dtype)
