"""Equation of state on ASE's ``EquationOfState``, and the evaluator the property workflows share.

:func:`equation_of_state` scales a structure's cell over a range of volumes, takes the energy of
every scaled cell (optionally after relaxing the ions at fixed cell) and fits an equation of state
(Birch-Murnaghan by default) with :class:`ase.eos.EquationOfState`: V0, E0 and the bulk modulus B.

:class:`Evaluator` is how every workflow of this package (EOS, phonons, elastic tensor) gets its
numbers. With a fastchgnet model (a name, a checkpoint, a model object or a chgnet ``CHGNet``,
converted once) all structures of a step go through one batched prediction
(:func:`fastchgnet.model.predict.predict`), and ion relaxations through the batched FIRE of
:func:`fastchgnet.sim.relax`. With any ASE calculator (chgnet's ``CHGNetCalculator``, or another
potential) the same workflow runs one calculator call, or one ASE ``FIRE`` run, per structure: this
is how the tests drive the same workflow with chgnet's calculator.

Units: volumes Å^3, energies eV (totals per cell), forces eV/Å, stresses GPa (positive =
tensile), bulk modulus GPa.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.units import GPa

from fastchgnet.md.calculator import as_atoms, make_calculator, resolve_model
from fastchgnet.md.relax import quiet_cell_filter_warnings
from fastchgnet.model.predict import predict
from fastchgnet.sim.fire import relax as batched_relax

__all__ = ["EOSResult", "Evaluator", "Point", "auto_relax_ions", "equation_of_state", "label_of",
           "new_file", "prepare", "relax_mode", "scaled_cells", "to_jsonable", "write_json"]

RELAX_MODES = ("none", "positions", "cell")


def label_of(atoms: Atoms) -> str:
    """A structure's name in messages: its formula and atom count."""
    return f"{atoms.get_chemical_formula()} ({len(atoms)} atoms)"


def new_file(path: str | Path, overwrite: bool) -> Path:
    """``path`` as a Path; FileExistsError if it exists and ``overwrite`` is False (nothing the
    project writes replaces an earlier file unless asked)."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} exists already; pass overwrite=True (CLI: --overwrite) to "
                              f"replace it, or choose another file")
    return p


def relax_mode(relax: bool | str | None) -> str:
    """``relax`` argument -> ``"none"``, ``"positions"`` or ``"cell"`` (True: ``"cell"``)."""
    if relax is None or relax is False:
        return "none"
    if relax is True:
        return "cell"
    if relax not in RELAX_MODES:
        raise ValueError(f"relax must be False, True or one of {RELAX_MODES}, got {relax!r}")
    return str(relax)


def _full_stress(voigt6_ev_a3: np.ndarray) -> np.ndarray:
    """ASE Voigt (xx, yy, zz, yz, xz, xy) eV/Å^3, or a 3x3 array -> (3, 3) GPa (same sign)."""
    s = np.asarray(voigt6_ev_a3, dtype=np.float64)
    if s.shape == (3, 3):
        return s / GPa
    xx, yy, zz, yz, xz, xy = s
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]]) / GPa


@dataclass
class Point:
    """One evaluated structure: total energy (eV), forces (n, 3) eV/Å, stress (3, 3) GPa."""

    atoms: Atoms
    energy: float
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    converged: bool = True
    steps: int = 0


class Evaluator:
    """Energies, forces, stresses and ion relaxations of many structures.

    Args:
        model: a pretrained name (``"0.3.0"``), a checkpoint path, a fastchgnet model or a chgnet
            ``CHGNet`` (batched), or an ASE ``Calculator`` (one call per structure).
        device, dtype: for a model loaded or converted here (see
            :func:`fastchgnet.md.calculator.resolve_model`); ignored for a calculator.
        batch_size: structures per batched model call.
    """

    def __init__(self, model: Any = "0.3.0", *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, batch_size: int = 32) -> None:
        self.batch_size = int(batch_size)
        if isinstance(model, Calculator):
            self.calculator: Calculator | None = model
            self.model: torch.nn.Module | None = None
        else:
            self.calculator = None
            self.model = resolve_model(model, device, dtype)

    @property
    def batched(self) -> bool:
        return self.model is not None

    def evaluate(self, structures: Sequence[Atoms], task: str = "efs") -> list[Point]:
        """Energy (always), forces (``f`` in task) and stress (``s`` in task) of each structure."""
        structures = list(structures)
        if self.model is not None:
            preds = predict(self.model, structures, task=task, batch_size=self.batch_size,
                            ids=[label_of(a) for a in structures])
            scale = self.model.config.is_intensive  # type: ignore[union-attr]
            return [Point(a, float(p["e"]) * (len(a) if scale else 1), p.get("f"),
                          None if "s" not in p else np.asarray(p["s"], dtype=np.float64))
                    for a, p in zip(structures, preds)]
        out = []
        for a in structures:
            a = a.copy()
            a.calc = self.calculator
            e = float(a.get_potential_energy())
            f = np.asarray(a.get_forces()) if "f" in task else None
            s = _full_stress(a.get_stress()) if "s" in task else None
            out.append(Point(a, e, f, s))
        return out

    def relax_ions(self, structures: Sequence[Atoms], fmax: float, steps: int) -> list[Point]:
        """Relax the positions at fixed cell with FIRE (ASE's algorithm and defaults): batched
        (:func:`fastchgnet.sim.relax`) for a model, ASE ``FIRE`` one structure at a time for a
        calculator. Energies, forces and stresses at the final geometries."""
        structures = list(structures)
        if self.model is not None:
            res = batched_relax(self.model, structures, fmax=fmax, steps=steps, cell_filter=False)
            return [Point(r.structure, r.energy, r.forces, np.asarray(r.stress, dtype=np.float64),
                          r.converged, r.steps) for r in res]
        from ase.optimize import FIRE

        out = []
        for a in structures:
            a = a.copy()
            a.calc = self.calculator
            opt = FIRE(a, logfile=None)
            conv = bool(opt.run(fmax=fmax, steps=steps))
            p = self.evaluate([a], "efs")[0]
            out.append(Point(a, p.energy, p.forces, p.stress, conv, int(opt.nsteps)))
        return out

    def relax(self, atoms: Atoms, mode: str, fmax: float, smax: float, steps: int) -> Point:
        """Relax one structure: ``"positions"`` (fixed cell, :meth:`relax_ions`) or ``"cell"``
        (positions and cell: ASE ``FIRE`` on a ``FrechetCellFilter``, stopped when the real
        largest force is at most ``fmax`` and the largest stress component at most ``smax``, as
        :class:`fastchgnet.md.StructOptimizer` judges; written out here so that it runs the same
        with any ASE calculator, whatever the shape of its stress result)."""
        if mode == "positions":
            return self.relax_ions([atoms], fmax, steps)[0]
        from ase.filters import FrechetCellFilter
        from ase.optimize import FIRE

        a = atoms.copy()
        a.calc = self.calculator if self.calculator is not None else make_calculator(self.model)
        opt = FIRE(FrechetCellFilter(a), logfile=None)
        conv, n = False, 0
        with quiet_cell_filter_warnings():
            for n, _ in enumerate(opt.irun(fmax=0.0, steps=steps)):
                f_now = float(np.linalg.norm(a.get_forces(), axis=1).max())
                s_now = float(np.abs(_full_stress(a.get_stress())).max())
                conv = f_now <= fmax and s_now <= smax
                if conv:
                    break
        p = self.evaluate([a], "efs")[0]
        p.atoms.calc = None
        p.converged, p.steps = conv, n
        return p


def prepare(structure: Any, evaluator: Evaluator, relax: bool | str | None, fmax: float,
            smax: float, steps: int) -> tuple[Atoms, Point | None, str]:
    """The workflows' starting structure: a copy of ``structure`` as ASE ``Atoms``, relaxed if
    asked (a relaxation that does not converge warns, naming the structure)."""
    mode = relax_mode(relax)
    atoms = as_atoms(structure).copy()
    atoms.calc = None
    if mode == "none":
        return atoms, None, mode
    p = evaluator.relax(atoms, mode, fmax, smax, steps)
    if not p.converged:
        warnings.warn(f"{label_of(atoms)}: the {mode} relaxation did not converge in {steps} "
                      f"steps (fmax {fmax} eV/A, smax {smax} GPa); results are for the last "
                      f"geometry", RuntimeWarning, stacklevel=3)
    out = p.atoms.copy()
    out.calc = None
    return out, p, mode


def auto_relax_ions(relax_ions: bool | str, atoms: Atoms) -> bool:
    """``"auto"``: relax the ions when the cell has more than one atom (a one-atom cell has no
    internal coordinates to relax)."""
    if relax_ions == "auto":
        return len(atoms) > 1
    if not isinstance(relax_ions, bool):
        raise ValueError(f"relax_ions must be True, False or 'auto', got {relax_ions!r}")
    return relax_ions


def to_jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, dict):
        return {k: to_jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_jsonable(x) for x in v]
    return v


def write_json(data: dict, path: str | Path, overwrite: bool = False) -> Path:
    """``data`` as JSON (indented) in ``path``; FileExistsError unless ``overwrite``."""
    p = new_file(path, overwrite)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(to_jsonable(data), indent=1) + "\n")
    return p


# ------------------------------------------------------------------------------------------------
# equation of state


@dataclass
class EOSResult:
    """An equation-of-state fit (energies and volumes per cell of ``n_atoms`` atoms).

    Attributes:
        formula, n_atoms: the structure.
        eos: ASE's EOS name (``birchmurnaghan``, ``murnaghan``, ``vinet``, ``sj``, ...).
        v0: equilibrium volume (Å^3), e0: energy there (eV), b: bulk modulus (GPa).
        volumes, energies: the sampled points (Å^3, eV).
        relax: ``"none"``, ``"positions"`` or ``"cell"`` (relaxation before scaling).
        relax_ions: whether the ions were relaxed at each volume.
        reference_volume: the volume the scaling started from (Å^3).
    """

    formula: str
    n_atoms: int
    eos: str
    v0: float
    e0: float
    b: float
    volumes: np.ndarray
    energies: np.ndarray
    relax: str = "none"
    relax_ions: bool = False
    reference_volume: float = math.nan
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain Python types (JSON-ready); per-atom values added."""
        return to_jsonable({"formula": self.formula, "n_atoms": self.n_atoms, "eos": self.eos,
                          "v0_A3": self.v0, "e0_eV": self.e0, "b_GPa": self.b,
                          "v0_per_atom_A3": self.v0 / self.n_atoms,
                          "e0_per_atom_eV": self.e0 / self.n_atoms,
                          "volumes_A3": self.volumes, "energies_eV": self.energies,
                          "relax": self.relax, "relax_ions": self.relax_ions,
                          "reference_volume_A3": self.reference_volume, **self.info})

    def plot(self, path: str | Path, overwrite: bool = False) -> Path:
        """E(V) points and the fit in an image file (Agg; no pyplot state)."""
        from ase.eos import EquationOfState
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        p = new_file(path, overwrite)
        fit = EquationOfState(self.volumes, self.energies, eos=self.eos)
        fit.fit(warn=False)
        _, _, _, _, x, y, v, e = fit.getplotdata()
        fig = Figure(figsize=(5, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(np.asarray(x) / self.n_atoms, np.asarray(y) / self.n_atoms, "-", label=self.eos)
        ax.plot(np.asarray(v) / self.n_atoms, np.asarray(e) / self.n_atoms, "o", label="computed")
        ax.axvline(self.v0 / self.n_atoms, color="0.7", lw=0.8)
        ax.set_xlabel("volume (Å$^3$/atom)")
        ax.set_ylabel("energy (eV/atom)")
        ax.set_title(f"{self.formula}: V0 = {self.v0 / self.n_atoms:.3f} Å$^3$/atom, "
                     f"B = {self.b:.1f} GPa", fontsize=9)
        ax.legend()
        fig.tight_layout()
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=120)
        return p


def scaled_cells(atoms: Atoms, n_points: int, max_strain: float, strain: str) -> list[Atoms]:
    """Copies of ``atoms`` with the cell scaled isotropically (atoms follow the cell): ``n_points``
    volume ratios evenly spaced in 1 ± ``max_strain`` (``strain="volume"``), or linear factors
    evenly spaced in 1 ± ``max_strain`` (``strain="linear"``)."""
    if n_points < 5:
        raise ValueError(f"n_points must be at least 5 for an EOS fit, got {n_points}")
    if not 0 < max_strain < 0.5:
        raise ValueError(f"max_strain must be in (0, 0.5), got {max_strain}")
    s = np.linspace(-max_strain, max_strain, n_points)
    if strain == "volume":
        factors = (1.0 + s) ** (1.0 / 3.0)
    elif strain == "linear":
        factors = 1.0 + s
    else:
        raise ValueError(f"strain must be 'volume' or 'linear', got {strain!r}")
    out = []
    for f in factors:
        a = atoms.copy()
        a.set_cell(atoms.cell[:] * f, scale_atoms=True)
        out.append(a)
    return out


def equation_of_state(
    structure: Any,
    model: Any = "0.3.0",
    *,
    eos: str = "birchmurnaghan",
    n_points: int = 11,
    max_strain: float = 0.06,
    strain: str = "volume",
    relax: bool | str | None = False,
    relax_ions: bool | str = "auto",
    fmax: float = 0.01,
    smax: float = 0.01,
    steps: int = 500,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    plot: str | Path | None = None,
    overwrite: bool = False,
) -> EOSResult:
    """Equation of state of one structure.

    Args:
        structure: pymatgen ``Structure`` or ASE ``Atoms`` (not modified).
        model: ``"0.3.0"``, a checkpoint, a fastchgnet or chgnet model (batched), or an ASE
            calculator (one call per volume); see :class:`Evaluator`.
        eos: ASE's EOS name (``birchmurnaghan``, ``murnaghan``, ``vinet``, ``birch``, ``sj``...).
        n_points, max_strain, strain: ``n_points`` cells from 1 - ``max_strain`` to 1 +
            ``max_strain`` in volume (``strain="volume"``, default: ±6 % in volume) or in lattice
            constant (``strain="linear"``).
        relax: relax first: False (default), ``"positions"``, ``"cell"`` or True (= ``"cell"``).
        relax_ions: relax the ions at each volume (FIRE, fixed cell): True, False or ``"auto"``
            (when the cell has more than one atom; symmetric cells then converge at step 0).
        fmax, smax, steps: relaxation criteria (eV/Å, GPa) and step budget.
        device, dtype: for a model loaded here.
        plot: an image file for E(V) and the fit (png, pdf, svg).
        overwrite: replace an existing ``plot`` file (default: FileExistsError, before any work).

    Returns:
        :class:`EOSResult` (V0 Å^3, E0 eV, B GPa per cell, and the E(V) points).

    Raises:
        ValueError naming the structure when the fitted minimum lies outside the sampled volumes
        (relax first, or widen ``max_strain``) or the fit fails.
    """
    from ase.eos import EquationOfState

    if plot is not None:
        new_file(plot, overwrite)
    ev = Evaluator(model, device=device, dtype=dtype)
    atoms, _, mode = prepare(structure, ev, relax, fmax, smax, steps)
    cells = scaled_cells(atoms, n_points, max_strain, strain)
    ions = auto_relax_ions(relax_ions, atoms)
    points = ev.relax_ions(cells, fmax, steps) if ions else ev.evaluate(cells, "e")
    vols = np.array([a.get_volume() for a in cells])
    ens = np.array([p.energy for p in points])
    name = label_of(atoms)
    if not np.all(np.isfinite(ens)):
        raise ValueError(f"{name}: non-finite energies in the EOS scan: {ens.tolist()}")
    fit = EquationOfState(vols, ens, eos=eos)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v0, e0, b = fit.fit(warn=False)
    except Exception as exc:  # scipy's curve_fit raises RuntimeError/ValueError/...
        raise ValueError(f"{name}: the {eos} fit failed ({type(exc).__name__}: {exc}); check the "
                         f"E(V) points, relax the structure first (relax='cell') or widen "
                         f"max_strain") from None
    if not vols.min() < v0 < vols.max():
        raise ValueError(f"{name}: the fitted minimum V0 = {v0:.3f} A^3 lies outside the sampled "
                         f"volumes [{vols.min():.3f}, {vols.max():.3f}] A^3; relax the structure "
                         f"first (relax='cell') or widen max_strain")
    info = {"n_points": n_points, "max_strain": max_strain, "strain": strain}
    if ions:
        info["ions_converged"] = all(p.converged for p in points)
    res = EOSResult(atoms.get_chemical_formula(empirical=False), len(atoms), eos, float(v0),
                    float(e0), float(b / GPa), vols, ens, mode, ions, float(atoms.get_volume()),
                    info)
    if plot is not None:
        res.plot(plot, overwrite=overwrite)
    return res
