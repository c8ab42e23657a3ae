"""Elastic tensor from the stresses of strained cells.

:func:`elastic_tensor` applies ± strains to each of the six Voigt components of a structure's cell
(atoms follow the cell), optionally relaxes the ions in every strained cell at fixed cell, fits
each stress component linearly against each strain component and returns the 6×6 stiffness tensor
C_ij = ∂σ_i/∂ε_j in GPa (symmetrised), with the Voigt, Reuss and Hill bulk and shear moduli.

All strained cells go through one batched model call, or, with ion relaxation, one batched FIRE
relaxation (:func:`fastchgnet.sim.relax`); an ASE calculator runs them one by one (see
:class:`fastchgnet.properties.eos.Evaluator`).

Conventions: Voigt order xx, yy, zz, yz, xz, xy; engineering shear strains (ε_4 = 2 ε_yz); stress
positive = tensile (so C_11 > 0 for a stable solid); GPa.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from ase import Atoms

from fastchgnet.properties.eos import Evaluator, auto_relax_ions, label_of, prepare, to_jsonable

__all__ = ["ElasticResult", "elastic_tensor", "moduli", "strained_cells", "voigt_strain_matrix"]

VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))
LABELS = ("xx", "yy", "zz", "yz", "xz", "xy")


def voigt_strain_matrix(component: int, magnitude: float) -> np.ndarray:
    """The symmetric 3×3 strain of Voigt component ``component`` (0-5) with value ``magnitude``
    (engineering shear: the off-diagonal entries are ``magnitude / 2``)."""
    i, j = VOIGT[component]
    eps = np.zeros((3, 3))
    if i == j:
        eps[i, i] = magnitude
    else:
        eps[i, j] = eps[j, i] = magnitude / 2.0
    return eps


def strained_cells(atoms: Atoms, strains: Sequence[float]) -> tuple[list[Atoms], np.ndarray]:
    """Cells ``L (I + ε)`` (rows are lattice vectors; atoms follow) for each of the six Voigt
    components and each strain magnitude in ``strains``: ``6 * len(strains)`` cells, component
    major, and the (6, len(strains)) magnitudes."""
    cells = []
    for k in range(6):
        for d in strains:
            a = atoms.copy()
            a.set_cell(atoms.cell[:] @ (np.eye(3) + voigt_strain_matrix(k, d)), scale_atoms=True)
            cells.append(a)
    return cells, np.tile(np.asarray(strains, dtype=np.float64), (6, 1))


def _voigt(s: np.ndarray) -> np.ndarray:
    return np.array([s[i, j] for i, j in VOIGT])


def moduli(c: np.ndarray) -> dict[str, float]:
    """Voigt, Reuss and Hill bulk (K) and shear (G) moduli (GPa), and the Hill Young's modulus
    and Poisson ratio, of a 6×6 stiffness tensor in GPa (Reuss values NaN for a singular C)."""
    c = np.asarray(c, dtype=np.float64)
    kv = (c[0, 0] + c[1, 1] + c[2, 2] + 2.0 * (c[0, 1] + c[1, 2] + c[0, 2])) / 9.0
    gv = (c[0, 0] + c[1, 1] + c[2, 2] - (c[0, 1] + c[1, 2] + c[0, 2])
          + 3.0 * (c[3, 3] + c[4, 4] + c[5, 5])) / 15.0
    try:
        s = np.linalg.inv(c)
        kr = 1.0 / (s[0, 0] + s[1, 1] + s[2, 2] + 2.0 * (s[0, 1] + s[1, 2] + s[0, 2]))
        gr = 15.0 / (4.0 * (s[0, 0] + s[1, 1] + s[2, 2]) - 4.0 * (s[0, 1] + s[1, 2] + s[0, 2])
                     + 3.0 * (s[3, 3] + s[4, 4] + s[5, 5]))
    except np.linalg.LinAlgError:
        kr = gr = math.nan
    kh, gh = (kv + kr) / 2.0, (gv + gr) / 2.0
    young = 9.0 * kh * gh / (3.0 * kh + gh)
    poisson = (3.0 * kh - 2.0 * gh) / (2.0 * (3.0 * kh + gh))
    return {"k_voigt": float(kv), "k_reuss": float(kr), "k_hill": float(kh),
            "g_voigt": float(gv), "g_reuss": float(gr), "g_hill": float(gh),
            "young_hill": float(young), "poisson_hill": float(poisson)}


@dataclass
class ElasticResult:
    """A stiffness tensor.

    Attributes:
        formula, n_atoms: the structure.
        c: (6, 6) stiffness tensor C_ij (GPa), symmetrised; Voigt order xx, yy, zz, yz, xz, xy.
        c_raw: the fitted tensor before symmetrisation (row: stress, column: strain).
        strains: the strain magnitudes applied to each Voigt component.
        relax: ``"none"``, ``"positions"`` or ``"cell"`` (relaxation before straining).
        relax_ions: whether the ions were relaxed in each strained cell.
        reference_stress: (3, 3) stress of the unstrained cell (GPa; should be ~0).
        stresses: (6, n_strains, 6) Voigt stresses (GPa) of the strained cells.
        moduli: see :func:`moduli`.
    """

    formula: str
    n_atoms: int
    c: np.ndarray
    c_raw: np.ndarray
    strains: np.ndarray
    relax: str
    relax_ions: bool
    reference_stress: np.ndarray
    stresses: np.ndarray
    moduli: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __getattr__(self, name: str) -> float:  # c11, c12, c44, ... (1-based Voigt indices)
        if len(name) == 3 and name[0] == "c" and name[1] in "123456" and name[2] in "123456":
            return float(self.c[int(name[1]) - 1, int(name[2]) - 1])
        raise AttributeError(name)

    def to_dict(self) -> dict:
        """Plain Python types (JSON-ready)."""
        return to_jsonable({"formula": self.formula, "n_atoms": self.n_atoms, "c_GPa": self.c,
                          "c_raw_GPa": self.c_raw, "voigt_order": list(LABELS),
                          "strains": self.strains, "relax": self.relax,
                          "relax_ions": self.relax_ions,
                          "reference_stress_GPa": self.reference_stress,
                          "stresses_GPa": self.stresses, "moduli_GPa": self.moduli, **self.info})


def elastic_tensor(
    structure: Any,
    model: Any = "0.3.0",
    *,
    strains: Sequence[float] = (-0.001, -0.0005, 0.0005, 0.001),
    relax: bool | str | None = False,
    relax_ions: bool | str = "auto",
    fmax: float = 1e-4,
    smax: float = 0.01,
    steps: int = 500,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> ElasticResult:
    """Elastic (stiffness) tensor of one structure from stress-strain fits.

    Args:
        structure: pymatgen ``Structure`` or ASE ``Atoms`` (not modified).
        model: ``"0.3.0"``, a checkpoint, a fastchgnet or chgnet model (batched), or an ASE
            calculator (one call per strained cell); see
            :class:`~fastchgnet.properties.eos.Evaluator`.
        strains: magnitudes applied to each Voigt component; at least two distinct values.
            Default ±0.05 % and ±0.1 %: the tangent at zero strain. CHGNet's stress is far from
            linear over the ±0.5 %/±1 % often used (Si: C11 189 GPa from ±0.5 %/±1 % against
            215 GPa at ±0.01 %), while float32 stress round-off (~1e-4 GPa) costs < 0.1 GPa here.
        relax: relax first: False (default), ``"positions"``, ``"cell"`` or True (= ``"cell"``).
            The fit is about the given cell, so a cell far from zero stress biases C.
        relax_ions: relax the ions in every strained cell at fixed cell (relaxed-ion tensor):
            True, False (clamped-ion) or ``"auto"`` (default: when the cell has more than one
            atom; in diamond Si the internal relaxation lowers C44 substantially).
        fmax, smax, steps: relaxation criteria (eV/Å, GPa) and step budget; the ions need a
            tight ``fmax`` (default 1e-4 eV/Å): the strain-induced forces are ~1e-2 eV/Å at 0.1 %.
        device, dtype: for a model loaded here.

    Returns:
        :class:`ElasticResult` (C in GPa; ``result.c11``, ``result.c44``... and
        ``result.moduli["k_hill"]``...).
    """
    strains_arr = np.asarray(strains, dtype=np.float64)
    if (strains_arr.ndim != 1 or len(np.unique(strains_arr)) < 2
            or np.any(np.abs(strains_arr) > 0.1)):
        raise ValueError(f"strains must be at least two distinct magnitudes within ±0.1, got "
                         f"{list(strains)}")
    ev = Evaluator(model, device=device, dtype=dtype)
    atoms, _, mode = prepare(structure, ev, relax, fmax, smax, steps)
    name = label_of(atoms)
    ions = auto_relax_ions(relax_ions, atoms)
    cells, mags = strained_cells(atoms, strains_arr)
    ref = atoms.copy()
    if ions:
        points = ev.relax_ions([ref] + cells, fmax, steps)
    else:
        points = ev.evaluate([ref] + cells, "es")
    sig = np.array([_voigt(p.stress) for p in points[1:]]).reshape(6, len(strains_arr), 6)
    if not np.all(np.isfinite(sig)):
        raise ValueError(f"{name}: non-finite stresses in the strained cells")
    c_raw = np.empty((6, 6))
    for j in range(6):  # column j: d sigma / d eps_j, least squares with intercept
        c_raw[:, j] = np.polyfit(mags[j], sig[j], 1)[0]
    c = 0.5 * (c_raw + c_raw.T)
    info: dict[str, Any] = {}
    if ions:
        info["ions_converged"] = all(p.converged for p in points)
        info["ion_relax_steps_max"] = max(p.steps for p in points)
    return ElasticResult(atoms.get_chemical_formula(empirical=False), len(atoms), c, c_raw,
                         strains_arr, mode, ions, np.asarray(points[0].stress), sig, moduli(c),
                         info)
