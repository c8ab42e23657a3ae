"""Periodic D3(BJ) dispersion (fastchgnet.properties.dispersion) on top of tad-dftd3."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

tad_dftd3 = pytest.importorskip("tad_dftd3")
tad_mctc = pytest.importorskip("tad_mctc")

from fastchgnet.properties import dispersion  # noqa: E402
from fastchgnet.properties.dispersion import D3Calculator, d3_energy, d3_parameters  # noqa: E402


def test_parameters_are_tad_pbe_bj():
    p = d3_parameters()
    assert float(p["a1"]) == pytest.approx(0.4289)
    assert float(p["a2"]) == pytest.approx(4.4407)
    assert float(p["s8"]) == pytest.approx(0.7875)
    assert float(p["s6"]) == 1.0 and float(p["s9"]) == 0.0
    with pytest.raises(ValueError, match="BJ"):
        d3_parameters(damping="zero")


@pytest.mark.parametrize("z, pos", [
    ([6, 8], [[0.0, 0.0, 0.0], [0.0, 0.0, 2.1]]),  # a dimer
    ([8, 1, 1], [[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]),  # water
])
def test_molecule_equals_tad_dftd3(z, pos):
    zt = torch.tensor(z)
    x = torch.tensor(pos, dtype=torch.float64)
    p = d3_parameters()
    ref = tad_dftd3.dftd3(zt, x * tad_mctc.units.AA2AU, p).sum() * tad_mctc.units.AU2EV
    assert float(d3_energy(zt, x, None, False, param=p)) == pytest.approx(float(ref), rel=1e-12)
    # the same molecule in a large periodic box: images beyond the 60 bohr cutoff add nothing
    box = torch.eye(3, dtype=torch.float64) * 40.0
    assert float(d3_energy(zt, x, box, True, param=p)) == pytest.approx(float(ref), rel=1e-12)
    # the ASE calculator
    atoms = Atoms(numbers=z, positions=pos)
    atoms.calc = D3Calculator()
    assert atoms.get_potential_energy() == pytest.approx(float(ref), rel=1e-12)


def test_periodic_supercell_is_extensive():
    si = bulk("Si", "diamond", a=5.43)
    si.rattle(0.03, seed=3)
    e1 = d3_energy(torch.tensor(si.numbers), torch.tensor(si.positions), torch.tensor(np.asarray(si.cell)))
    sc = si.repeat((2, 1, 1))
    e2 = d3_energy(torch.tensor(sc.numbers), torch.tensor(sc.positions), torch.tensor(np.asarray(sc.cell)))
    assert float(e2) == pytest.approx(2 * float(e1), rel=1e-10)
    assert -0.5 < float(e1) / len(si) < -0.1  # eV/atom: D3(BJ)-PBE of Si is about -0.3


def test_forces_and_stress_are_derivatives():
    atoms = bulk("NaCl", "rocksalt", a=5.6) * (1, 1, 1)
    atoms.rattle(0.05, seed=4)
    atoms.calc = D3Calculator()
    f = atoms.get_forces()
    s = atoms.get_stress(voigt=False)
    h = 1e-4
    for i, a in [(0, 0), (1, 2)]:
        e = []
        for sign in (1, -1):
            b = atoms.copy()
            b.positions[i, a] += sign * h
            b.calc = D3Calculator()
            e.append(b.get_potential_energy())
        assert -(e[0] - e[1]) / (2 * h) == pytest.approx(f[i, a], abs=1e-6)
    # stress: (1/V) dE/d(strain), strain applied to cell and positions. Under strain, far pairs
    # cross the hard 60 bohr cutoff (as in tad-dftd3): each adds a jump of ~1e-7 eV, which puts
    # ~2e-5 eV/Å^3 (0.2 %) into the finite difference whatever the step; autograd differentiates
    # the smooth part.
    vol = atoms.get_volume()
    for (p, q) in [(0, 0), (0, 1)]:
        e = []
        for sign in (1, -1):
            eps = np.eye(3)
            eps[p, q] += sign * h
            b = atoms.copy()
            b.set_cell(np.asarray(atoms.cell) @ eps, scale_atoms=False)
            b.set_positions(atoms.get_positions() @ eps)
            b.calc = D3Calculator()
            e.append(b.get_potential_energy())
        assert (e[0] - e[1]) / (2 * h) / vol == pytest.approx(s[p, q], abs=5e-5)
    assert np.abs(f.sum(0)).max() < 1e-10


def test_with_dispersion_sums_chgnet_and_d3(model):
    atoms = bulk("Si", "diamond", a=5.43)
    calc = dispersion.with_dispersion(model=model)
    atoms.calc = calc
    e = atoms.get_potential_energy()
    chg, d3 = calc.mixer.calcs
    assert e == pytest.approx(chg.get_potential_energy(atoms) + d3.get_potential_energy(atoms))
    assert atoms.get_stress().shape == (6,)


def test_missing_tad_dftd3_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def fake(name, *args, **kwargs):
        if name.startswith("tad_dftd3"):
            raise ImportError("No module named 'tad_dftd3'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r"fastchgnet\[d3\]"):
        D3Calculator()
    with pytest.raises(ImportError, match=r"pip install"):
        d3_energy(torch.tensor([6, 8]), torch.zeros(2, 3, dtype=torch.float64))
