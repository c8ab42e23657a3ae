"""Names of the model outputs, with their shapes and units, and the task strings.

A model's ``forward(batch, task)`` returns a dict keyed by these names; ``predict`` splits the
per-atom and per-structure entries back into one dict per structure. Shapes are those of a batch
of ``n_graphs`` structures with ``n_atoms`` atoms in all.
"""

from __future__ import annotations

ENERGY = "e"  # (n_graphs,) eV/atom (eV per structure for an extensive model), AtomRef included
FORCES = "f"  # (n_atoms, 3) eV/Å
STRESS = "s"  # (n_graphs, 3, 3) GPa, positive = tensile
MAGMOMS = "m"  # (n_atoms,) μB, magnitudes
SITE_ENERGIES = "site_energies"  # (n_atoms,) eV, sum to the structure's energy
CRYSTAL_FEA = "crystal_fea"  # (n_graphs, atom_fea_dim) summed final atom features
ATOM_FEA = "atom_fea"  # (n_atoms, atom_fea_dim) atom features after the last interaction block

PER_GRAPH = (ENERGY, STRESS, CRYSTAL_FEA)
PER_ATOM = (FORCES, MAGMOMS, SITE_ENERGIES, ATOM_FEA)

#: task strings: which of e, f, s, m to compute (e always)
VALID_TASKS = ("e", "ef", "em", "efs", "efsm", "es", "esm", "efm")


def check_task(task: str) -> None:
    """Raise a ValueError unless ``task`` is one of :data:`VALID_TASKS`."""
    if task not in VALID_TASKS:
        raise ValueError(f"invalid task {task!r}; use one of {VALID_TASKS}")


__all__ = ["ATOM_FEA", "CRYSTAL_FEA", "ENERGY", "FORCES", "MAGMOMS", "PER_ATOM", "PER_GRAPH",
           "SITE_ENERGIES", "STRESS", "VALID_TASKS", "check_task"]
