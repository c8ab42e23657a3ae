"""The result of a relaxation, shared by the batched FIRE relaxer (:func:`fastchgnet.sim.relax`)
and the ASE relaxer (:class:`fastchgnet.md.StructOptimizer`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["RelaxResult"]


@dataclass
class RelaxResult:
    """One relaxed structure: final geometry, the potential's outputs there, and how it ended.

    Attributes:
        structure: the relaxed structure, of the input's type (pymatgen ``Structure`` or ASE
            ``Atoms``).
        energy: final total energy (eV).
        converged: whether the convergence criterion was met within the step budget.
        steps: optimiser steps taken (also :attr:`n_steps`).
        forces: (n, 3) final forces (eV/Å).
        stress: (3, 3) final stress (GPa, positive = tensile).
        fmax: final largest atomic force (eV/Å).
        smax: final largest stress residual ``|σ_ij + p δ_ij|`` (GPa) when the cell relaxed, else 0.
        atoms: the relaxed ASE ``Atoms`` (the ASE relaxer: the input object when one was given,
            with its calculator; the batched relaxer: ``structure`` when it is an ``Atoms``, else None).
        final_structure: the relaxed pymatgen ``Structure`` (the ASE relaxer adds the predicted
            ``magmom`` site property, as chgnet's ``StructOptimizer.relax``; the batched relaxer:
            ``structure`` when it is a ``Structure``, else None).
        trajectory: the recorded frames (the ASE relaxer's
            :class:`~fastchgnet.md.dynamics.FrameRecorder`), or None.
        info: anything else.

    ``result["final_structure"]`` reads an attribute, as chgnet's result dict.
    """

    structure: Any
    energy: float
    converged: bool
    steps: int
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    fmax: float = math.nan
    smax: float = math.nan
    atoms: Any = None
    final_structure: Any = None
    trajectory: Any = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.atoms is None and hasattr(self.structure, "get_positions"):
            self.atoms = self.structure
        if self.final_structure is None and hasattr(self.structure, "lattice") \
                and hasattr(self.structure, "sites"):
            self.final_structure = self.structure

    @property
    def n_steps(self) -> int:
        """Optimiser steps taken (the name of the batched relaxer's results)."""
        return self.steps

    def __getitem__(self, key: str) -> Any:  # chgnet-style access: result["final_structure"]
        return getattr(self, key)
