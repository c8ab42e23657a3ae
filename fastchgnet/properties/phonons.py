"""Harmonic phonons with phonopy (finite displacements), forces from the model in one batch.

:func:`phonons` builds phonopy's supercell and its symmetry-reduced displaced supercells, computes
the forces of all displaced supercells in one batched model call (an ASE calculator: one call
each), produces the force constants and returns frequencies at Γ, along a band path (ASE's
special-point path of the primitive cell) and on a mesh, with the total DOS and optionally the
thermal properties.

phonopy is an optional dependency: ``pip install fastchgnet[phonons]``.

Units: frequencies THz (phonopy's default for eV, Å and amu), force constants eV/Å², displacement
Å; thermal properties in phonopy's units (free energy kJ/mol, entropy and heat capacity J/K/mol,
per mole of primitive cells).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from ase import Atoms

from fastchgnet.properties.eos import Evaluator, label_of, new_file, prepare, to_jsonable

__all__ = ["PhononResult", "import_phonopy", "phonons", "supercell_matrix"]


def import_phonopy() -> Any:
    """The ``phonopy`` module; ImportError naming the ``fastchgnet[phonons]`` extra without it."""
    try:
        import phonopy
    except ImportError as exc:
        raise ImportError("the phonon workflow needs phonopy, which is not installed: "
                          "pip install 'fastchgnet[phonons]' (or pip install phonopy)") from exc
    return phonopy


def supercell_matrix(supercell: int | Sequence[int] | Sequence[Sequence[int]]) -> np.ndarray:
    """3×3 integer supercell matrix from an int (n×n×n), three ints (diagonal) or a 3×3."""
    m = np.asarray(supercell)
    if m.ndim == 0:
        m = np.eye(3, dtype=int) * int(m)
    elif m.shape == (3,):
        m = np.diag(m.astype(int))
    if m.shape != (3, 3) or not np.allclose(m, np.round(m)) or round(abs(np.linalg.det(m))) < 1:
        raise ValueError(f"supercell must be an int, three ints or a 3x3 integer matrix with a "
                         f"nonzero determinant, got {np.asarray(supercell).tolist()}")
    return np.round(m).astype(int)


def _to_phonopy_atoms(atoms: Atoms) -> Any:
    from phonopy.structure.atoms import PhonopyAtoms

    return PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=np.asarray(atoms.cell[:]),
                        scaled_positions=atoms.get_scaled_positions(wrap=False))


def _to_atoms(cell: Any) -> Atoms:
    return Atoms(symbols=cell.symbols, cell=cell.cell, scaled_positions=cell.scaled_positions,
                 pbc=True)


@dataclass
class PhononResult:
    """Harmonic phonons of one structure.

    Attributes:
        formula, n_atoms: the unit cell given (after the optional relaxation).
        supercell_matrix: (3, 3) integer matrix; displacement: Å; n_displacements: supercells.
        force_constants: phonopy's force constants (eV/Å²).
        gamma_frequencies: (3 n_prim,) frequencies at Γ (THz), ascending.
        band: ``{"qpoints", "x", "special_x", "labels", "frequencies"}`` along the band path
            (q in reduced coordinates of the primitive cell's reciprocal lattice).
        mesh: ``{"mesh", "qpoints", "weights", "frequencies"}``; dos: ``{"frequency", "dos"}``.
        thermal: ``{"temperatures", "free_energy", "entropy", "heat_capacity"}`` or None.
        max_residual_force: largest force in the undisplaced supercell (eV/Å; should be ~0).
        phonopy: the ``Phonopy`` object, for anything else phonopy computes (not in ``to_dict``).
    """

    formula: str
    n_atoms: int
    supercell_matrix: np.ndarray
    displacement: float
    n_displacements: int
    force_constants: np.ndarray
    gamma_frequencies: np.ndarray
    band: dict
    mesh: dict
    dos: dict
    thermal: dict | None
    max_residual_force: float
    relax: str = "none"
    phonopy: Any = field(default=None, repr=False)

    @property
    def min_frequency(self) -> float:
        """Lowest frequency on the band path and the mesh (THz; imaginary modes are negative)."""
        return float(min(np.min(self.band["frequencies"]), np.min(self.mesh["frequencies"])))

    def to_dict(self, force_constants: bool = False) -> dict:
        """Plain Python types (JSON-ready); the force constants only when asked (they are big)."""
        d = {"formula": self.formula, "n_atoms": self.n_atoms,
             "supercell_matrix": self.supercell_matrix, "displacement_A": self.displacement,
             "n_displacements": self.n_displacements, "relax": self.relax,
             "gamma_frequencies_THz": self.gamma_frequencies, "band": self.band,
             "mesh": self.mesh, "dos": self.dos, "thermal": self.thermal,
             "max_residual_force_eV_A": self.max_residual_force,
             "min_frequency_THz": self.min_frequency}
        if force_constants:
            d["force_constants_eV_A2"] = self.force_constants
        return to_jsonable(d)

    def plot(self, path: str | Path, overwrite: bool = False) -> Path:
        """Band structure and DOS side by side in an image file (Agg; no pyplot state)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        p = new_file(path, overwrite)
        fig = Figure(figsize=(7, 4))
        FigureCanvasAgg(fig)
        ax, ax_dos = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 1]})
        x, freqs = np.asarray(self.band["x"]), np.asarray(self.band["frequencies"])
        ax.plot(x, freqs, color="C0", lw=1.2)
        for sx in self.band["special_x"]:
            ax.axvline(sx, color="0.7", lw=0.6)
        ax.axhline(0.0, color="0.5", lw=0.6)
        ax.set_xticks(self.band["special_x"])
        ax.set_xticklabels(["Γ" if lab == "G" else lab for lab in self.band["labels"]])
        ax.set_xlim(x[0], x[-1])
        ax.set_ylabel("frequency (THz)")
        ax.set_title(f"{self.formula}, supercell "
                     f"{'x'.join(str(v) for v in np.diag(self.supercell_matrix))}", fontsize=9)
        ax_dos.plot(self.dos["dos"], self.dos["frequency"], color="C1", lw=1.2)
        ax_dos.set_xlabel("DOS")
        ax_dos.set_xlim(left=0.0)
        fig.tight_layout()
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=120)
        return p


def phonons(
    structure: Any,
    model: Any = "0.3.0",
    *,
    supercell: int | Sequence[int] | Sequence[Sequence[int]] = 2,
    displacement: float = 0.01,
    primitive_matrix: Any = "auto",
    mesh: int | Sequence[int] = (10, 10, 10),
    band_points: int = 101,
    temperatures: Sequence[float] | None = None,
    relax: bool | str | None = False,
    fmax: float = 0.005,
    smax: float = 0.01,
    steps: int = 500,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    symprec: float = 1e-5,
    plot: str | Path | None = None,
    overwrite: bool = False,
) -> PhononResult:
    """Harmonic phonons of one structure with phonopy.

    Args:
        structure: pymatgen ``Structure`` or ASE ``Atoms`` (not modified); should be relaxed
            (``relax=``), else the residual forces enter the force constants.
        model: ``"0.3.0"``, a checkpoint, a fastchgnet or chgnet model (all displaced supercells
            in one batched call), or an ASE calculator (one call each).
        supercell: supercell of the given cell: an int (default 2: 2×2×2, 16 atoms for the
            2-atom Si cell; converge it for production, the model's interactions reach beyond
            its 6 Å cutoff through message passing), three ints, or a 3×3 matrix.
        displacement: phonopy's displacement (Å); 0.01 is phonopy's default.
        primitive_matrix: phonopy's (``"auto"``: found by symmetry; None: the given cell).
        mesh: Γ-centred q-point mesh (three ints, or phonopy's length as one number).
        band_points: q-points along ASE's special-point path of the primitive cell.
        temperatures: K, for the thermal properties (None: not computed); the acoustic modes
            at Γ are left out of the sums (phonopy's ``exclude_gamma_acoustic``).
        relax: relax first: False (default), ``"positions"``, ``"cell"`` or True (= ``"cell"``).
        fmax, smax, steps: relaxation criteria (eV/Å, GPa) and step budget.
        device, dtype: for a model loaded here (``torch.float64`` for the smoothest differences;
            float32 forces carry ~1e-5 eV/Å of round-off).
        symprec: phonopy's symmetry tolerance (Å).
        plot: an image file for the band structure and DOS.
        overwrite: replace an existing ``plot`` file (default: FileExistsError, before any work).

    Returns:
        :class:`PhononResult` (frequencies in THz).
    """
    import_phonopy()
    from ase.cell import Cell
    from phonopy import Phonopy

    if displacement <= 0:
        raise ValueError(f"displacement must be positive, got {displacement}")
    scm = supercell_matrix(supercell)
    if plot is not None:
        new_file(plot, overwrite)
    ev = Evaluator(model, device=device, dtype=dtype)
    atoms, _, mode = prepare(structure, ev, relax, fmax, smax, steps)
    name = label_of(atoms)
    with warnings.catch_warnings():  # "auto" is asked for here, not a silent default
        warnings.filterwarnings("ignore", message="primitive_matrix defaulted to 'auto'")
        ph = Phonopy(_to_phonopy_atoms(atoms), supercell_matrix=scm,
                     primitive_matrix=primitive_matrix, symprec=symprec)
    ph.generate_displacements(distance=displacement)
    cells = [_to_atoms(sc) for sc in [ph.supercell] + list(ph.supercells_with_displacements)]
    points = ev.evaluate(cells, "ef")
    forces = np.array([p.forces for p in points[1:]], dtype=np.float64)
    if not np.all(np.isfinite(forces)):
        raise ValueError(f"{name}: non-finite forces in the displaced supercells")
    residual = float(np.linalg.norm(points[0].forces, axis=1).max())
    ph.forces = forces
    ph.produce_force_constants(show_drift=False)

    ph.run_qpoints([[0.0, 0.0, 0.0]])
    gamma = np.sort(np.asarray(ph.qpoints.frequencies[0]))

    path = Cell(ph.primitive.cell).bandpath(npoints=band_points)
    x, special_x, labels = path.get_linear_kpoint_axis()
    ph.run_qpoints(path.kpts)
    band = {"qpoints": path.kpts, "x": x, "special_x": special_x, "labels": list(labels),
            "path": path.path, "frequencies": np.asarray(ph.qpoints.frequencies)}

    mesh_arg = mesh if np.ndim(mesh) == 0 else [int(v) for v in mesh]  # type: ignore[union-attr]
    ph.run_mesh(mesh_arg, is_gamma_center=True)
    mesh_out = {"mesh": np.asarray(ph.mesh_numbers), "qpoints": np.asarray(ph.mesh.qpoints),
                "weights": np.asarray(ph.mesh.weights),
                "frequencies": np.asarray(ph.mesh.frequencies)}
    ph.run_total_dos()
    dos = {"frequency": np.asarray(ph.total_dos.frequency_points),
           "dos": np.asarray(ph.total_dos.dos)}
    thermal = None
    if temperatures is not None:
        # the three acoustic modes at Gamma are zero up to round-off (+-0.01 THz); left in, their
        # sign would decide whether they count (phonopy skips negative frequencies)
        ph.run_thermal_properties(temperatures=list(temperatures), exclude_gamma_acoustic=True)
        tp = ph.thermal_properties
        thermal = {k: np.asarray(getattr(tp, k)) for k in
                   ("temperatures", "free_energy", "entropy", "heat_capacity")}
    res = PhononResult(atoms.get_chemical_formula(empirical=False), len(atoms), scm,
                       float(displacement), len(cells) - 1, np.asarray(ph.force_constants), gamma,
                       band, mesh_out, dos, thermal, residual, mode, ph)
    if plot is not None:
        res.plot(plot, overwrite=overwrite)
    return res
