"""DFT-D3(BJ) dispersion for periodic and molecular systems, on top of CHGNet (optional).

CHGNet was trained on PBE(+U) energies, which miss most of the dispersion energy; D3 adds it
as a correction. The D3 model data — reference C6 coefficients and their coordination-number
interpolation, covalent radii, <r^4>/<r^2> values, the counting function and the rational
(Becke-Johnson) damping — and the damping parameters come from ``tad-dftd3`` (a maintained torch
implementation of D3, ``pip install "fastchgnet[d3]"``). ``tad-dftd3`` 0.7.0 handles molecules
only (no cell); this module adds the periodic lattice sum: every pair (i, j, image T) within the
cutoffs enters the coordination numbers and the two-body sum, exactly the finite-system
expressions of ``tad_dftd3.dftd3`` with the pair list extended over images.

* Default parameters: PBE with BJ damping, from ``tad_dftd3``'s parameter table
  (``get_functional_params("pbe", "bj")``: s6 = 1, a1 = 0.4289, s8 = 0.7875, a2 = 4.4407 bohr,
  Grimme et al., J. Comput. Chem. 32, 1456 (2011), doi:10.1002/jcc.21759).
* Two-body term only: the three-body Axilrod-Teller-Muto term is off (``s9 = 0``), as in the
  original ``dftd3`` program without ``-abc`` and ASE's ``DFTD3`` default.
* Cutoffs: tad-dftd3's (``Cutoff()``: 40 bohr for coordination numbers, 60 bohr for the
  dispersion sum).
* Forces and stress by autograd of the energy with respect to positions and a homogeneous
  strain (the stress sign of ASE and of the rest of fastchgnet: positive = tensile).

Units: inputs Å; energies eV, forces eV/Å, ASE stress eV/Å^3 (Voigt). Internally bohr and
hartree, with tad-mctc's conversion constants.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ase.calculators.calculator import Calculator
from torch import Tensor

__all__ = ["D3Calculator", "d3_energy", "d3_parameters", "with_dispersion"]

_INSTALL = 'D3 dispersion needs tad-dftd3: pip install "fastchgnet[d3]" (or pip install tad-dftd3)'
# largest number of (atom, atom, image) candidates screened at once (bounded temporaries)
_SCREEN_CHUNK = 1 << 22


def _tad() -> Any:
    try:
        import tad_dftd3
        import tad_mctc
    except ImportError as exc:  # pragma: no cover - exercised with a monkeypatched import
        raise ImportError(_INSTALL) from exc
    return tad_dftd3, tad_mctc


def d3_parameters(functional: str = "pbe", damping: str = "bj", *,
                  dtype: torch.dtype = torch.float64, device: Any = None) -> dict[str, Tensor]:
    """The damping parameters of ``functional`` from tad-dftd3's table, without the three-body
    term (``s9 = 0``). Only rational (BJ) damping is implemented here."""
    if damping != "bj":
        raise ValueError(f"only BJ (rational) damping is implemented, got damping={damping!r}")
    d3, _ = _tad()
    from tad_dftd3.param.functional import get_functional_params

    p = get_functional_params(functional, damping, dtype=dtype, device=device)
    p["s9"] = torch.zeros((), dtype=dtype, device=device)
    return p


def _images(cell: Tensor, pbc: Tensor, cutoff: float) -> Tensor:
    """(T, 3) integer image vectors covering a sphere of radius ``cutoff`` (same length unit as
    ``cell``) around any point of the cell; only the zero image along non-periodic axes."""
    cross = torch.stack([torch.linalg.cross(cell[1], cell[2]), torch.linalg.cross(cell[2], cell[0]),
                         torch.linalg.cross(cell[0], cell[1])])
    vol = torch.abs((cell[0] * cross[0]).sum())
    height = vol / torch.linalg.vector_norm(cross, dim=1)
    n = torch.where(pbc, torch.ceil(cutoff / height), torch.zeros_like(height)).long().tolist()
    axes = [torch.arange(-k, k + 1, device=cell.device) for k in n]
    return torch.cartesian_prod(*axes).reshape(-1, 3)


def _pairs(pos: Tensor, cell: Tensor, images: Tensor, cutoff: float) -> tuple[Tensor, Tensor, Tensor]:
    """Directed pairs (i, j, image index) with ``|x_j + T L - x_i| <= cutoff``, excluding an atom
    with itself in the zero image; screened without gradients, in chunks of images."""
    n = pos.shape[0]
    with torch.no_grad():
        shifts = images.to(pos.dtype) @ cell
        diff = pos[None, :, :] - pos[:, None, :]  # (i, j, 3): x_j - x_i
        per = max(1, _SCREEN_CHUNK // max(n * n, 1))
        zero = int(torch.nonzero((images == 0).all(1))[0]) if (images == 0).all(1).any() else -1
        out = []
        for lo in range(0, images.shape[0], per):  # chunks of images, not atoms or pairs
            sh = shifts[lo:lo + per]
            r2 = ((diff[:, :, None, :] + sh[None, None, :, :]) ** 2).sum(-1)  # (i, j, t)
            keep = r2 <= cutoff * cutoff
            if lo <= zero < lo + sh.shape[0]:
                keep[:, :, zero - lo] &= ~torch.eye(n, dtype=torch.bool, device=pos.device)
            i, j, t = torch.nonzero(keep, as_tuple=True)
            out.append((i, j, t + lo))
    return tuple(torch.cat(x) for x in zip(*out))  # type: ignore[return-value]


def d3_energy(numbers: Tensor, positions: Tensor, cell: Tensor | None = None, pbc: Any = True, *,
              param: dict[str, Tensor] | None = None, functional: str = "pbe") -> Tensor:
    """D3(BJ) two-body dispersion energy (eV, a 0-d tensor) of one structure, differentiable
    with respect to ``positions`` (Å, (N, 3)) and ``cell`` (Å, rows are lattice vectors).

    ``cell=None`` or ``pbc=False`` is a molecule (no images). ``param`` defaults to
    :func:`d3_parameters` of ``functional``; ``param["s9"]`` must be 0 (no three-body term).
    """
    d3, mctc = _tad()
    from tad_dftd3 import data as d3data
    from tad_dftd3 import model as d3model
    from tad_mctc.data import radii

    dd = {"dtype": positions.dtype, "device": positions.device}
    if param is None:
        param = d3_parameters(functional, **dd)
    if float(param.get("s9", 0.0)) != 0.0:
        raise ValueError("the three-body (ATM) term is not implemented for periodic D3: set s9 = 0")
    numbers = torch.as_tensor(numbers, device=positions.device).long()
    if int(numbers.max()) >= d3.defaults.MAX_ELEMENT or int(numbers.min()) < 1:
        raise ValueError(f"D3 has parameters for Z = 1..{d3.defaults.MAX_ELEMENT - 1}, got atomic "
                         f"numbers {sorted(set(numbers.tolist()))}")
    if cell is None:
        cell = torch.eye(3, **dd)
        pbc = False
    pbc_t = torch.as_tensor(pbc, dtype=torch.bool, device=positions.device).expand(3)
    to_au = mctc.units.AA2AU
    pos, lat = positions * to_au, cell.to(**dd) * to_au
    cut = d3.Cutoff(**dd)
    rc_cn, rc_disp = float(cut.cn), float(cut.disp2)
    images = _images(lat.detach(), pbc_t, max(rc_cn, rc_disp))
    i, j, t = _pairs(pos.detach(), lat.detach(), images, max(rc_cn, rc_disp))
    shift = images.index_select(0, t).to(pos.dtype) @ lat
    vec = pos.index_select(0, j) - pos.index_select(0, i) + shift
    r = torch.linalg.vector_norm(vec, dim=1)
    zi, zj = numbers.index_select(0, i), numbers.index_select(0, j)

    # coordination numbers over the periodic pairs (tad-dftd3's counting function and radii)
    rcov = radii.COV_D3(**dd)
    count = d3.ncoord.exp_count(r, rcov[zi] + rcov[zj])
    count = torch.where(r <= rc_cn, count, torch.zeros_like(count))
    cn = torch.zeros(numbers.shape[0], **dd).index_add(0, i, count)
    # C6 of each atom pair from the references weighted by the coordination numbers
    ref = d3.reference.Reference(**dd)
    weights = d3model.weight_references(numbers, cn, ref, d3model.gaussian_weight)
    c6 = d3model.atomic_c6(numbers, weights, ref)[i, j]
    r4r2 = d3data.R4R2(**dd)
    qq = 3.0 * r4r2[zi] * r4r2[zj]
    in_disp = r <= rc_disp
    t6 = torch.where(in_disp, d3.damping.rational_damping(6, r, qq, param), torch.zeros_like(r))
    t8 = torch.where(in_disp, d3.damping.rational_damping(8, r, qq, param), torch.zeros_like(r))
    s6 = param.get("s6", torch.ones((), **dd))
    s8 = param["s8"]
    e_ha = -0.5 * (s6 * (c6 * t6).sum() + s8 * (c6 * qq * t8).sum())
    return e_ha * mctc.units.AU2EV


def _energy_forces_stress(numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray,
                          pbc: np.ndarray, param: dict[str, Tensor] | None, functional: str,
                          dtype: torch.dtype, device: Any) -> tuple[float, np.ndarray, np.ndarray | None]:
    dd = {"dtype": dtype, "device": device}
    pos = torch.as_tensor(positions, **dd).requires_grad_(True)
    lat = torch.as_tensor(cell, **dd)
    periodic = bool(np.all(pbc))
    strain = torch.zeros(3, 3, **dd, requires_grad=periodic)
    deform = torch.eye(3, **dd) + strain
    z = torch.as_tensor(np.asarray(numbers), device=device)
    e = d3_energy(z, pos @ deform, lat @ deform, torch.as_tensor(pbc), param=param,
                  functional=functional)
    wrt = [pos, strain] if periodic else [pos]
    grads = torch.autograd.grad(e, wrt)
    forces = -grads[0].detach().cpu().double().numpy()
    stress = None
    if periodic:
        vol = abs(float(torch.linalg.det(lat.double())))
        stress = grads[1].detach().cpu().double().numpy() / vol  # eV/Å^3, positive = tensile
    return float(e.detach()), forces, stress


class D3Calculator(Calculator):
    """ASE calculator of the D3(BJ) dispersion energy, forces and (periodic cells) stress.

    Args:
        functional: the functional whose BJ parameters to use (tad-dftd3's table; default PBE).
        param: explicit parameters ``{"s6", "s8", "a1", "a2"}`` (tensors or floats) instead.
        dtype, device: of the computation (default float64 on the CPU).

    Combine with CHGNet by :func:`with_dispersion` (an ASE ``SumCalculator``).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, functional: str = "pbe", *, param: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float64, device: Any = "cpu", **kwargs: Any) -> None:
        _tad()  # fail now, with the install hint, rather than at the first calculation
        super().__init__(**kwargs)
        self.functional = functional
        self.dtype, self.device = dtype, device
        self.param = (None if param is None else
                      {k: torch.as_tensor(v, dtype=dtype, device=device) for k, v in param.items()})

    def calculate(self, atoms: Any = None, properties: Any = None,
                  system_changes: Any = None) -> None:
        from ase.calculators.calculator import PropertyNotImplementedError, all_changes
        from ase.stress import full_3x3_to_voigt_6_stress

        super().calculate(atoms, properties or ["energy"], system_changes or all_changes)
        a = self.atoms
        pbc = np.asarray(a.pbc, dtype=bool)
        if pbc.any() and not pbc.all():
            raise ValueError(f"structure {a.get_chemical_formula()}: D3 needs pbc all True or all "
                             f"False, got {pbc.tolist()}")
        e, f, s = _energy_forces_stress(a.numbers, a.get_positions(), np.asarray(a.cell),
                                        pbc, self.param, self.functional, self.dtype, self.device)
        self.results = {"energy": e, "free_energy": e, "forces": f}
        if s is not None:
            self.results["stress"] = full_3x3_to_voigt_6_stress(s)
        elif "stress" in (properties or ()):
            raise PropertyNotImplementedError("stress of a non-periodic structure")


def with_dispersion(calculator: Any = None, *, model: Any = "0.3.0", functional: str = "pbe",
                    **calculator_kwargs: Any) -> Any:
    """CHGNet + D3(BJ): an ASE ``SumCalculator`` of ``calculator`` (default: a
    :class:`fastchgnet.CHGNetCalculator` of ``model`` with ``calculator_kwargs``) and a
    :class:`D3Calculator` of ``functional``.

    The sum provides energy, free_energy, forces and stress; CHGNet's magnetic moments stay on
    the first calculator (``calc.mixer.calcs[0]``).
    """
    from ase.calculators.mixing import SumCalculator

    d3calc = D3Calculator(functional)
    if calculator is None:
        from fastchgnet.md.calculator import CHGNetCalculator

        calculator = CHGNetCalculator(model, **calculator_kwargs)
    return SumCalculator([calculator, d3calc])
