"""The autograd Hessian (fastchgnet.properties.hessian) against finite differences of forces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk

import fastchgnet
from fastchgnet.properties.hessian import gamma_frequencies, hessian


def _si2():
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.02, seed=1)
    return atoms


def _fd_hessian(model, atoms, h=1e-4, indices=None):
    """Central differences of the model's forces: column 3i+a is -(F(x+h) - F(x-h)) / 2h.

    The step is 1e-4 Å (float64): CHGNet's third derivatives are large, and the central
    difference error, which falls as h^2, was measured at 4e-3 eV/Å^2 for h = 1e-3 Å and 4e-5
    for 1e-4 Å on rattled 2-atom Si (|H| up to 9 eV/Å^2)."""
    n3 = 3 * len(atoms)
    cols = range(n3) if indices is None else [3 * i + a for i in indices for a in range(3)]
    displaced = []
    for k in cols:
        for sign in (1.0, -1.0):
            a = atoms.copy()
            pos = a.get_positions()
            pos[k // 3, k % 3] += sign * h
            a.set_positions(pos)
            displaced.append(a)
    preds = fastchgnet.predict(model, displaced, task="ef", batch_size=64)
    f = np.stack([p["f"].reshape(-1) for p in preds]).reshape(len(cols), 2, n3)
    return -(f[:, 0] - f[:, 1]) / (2 * h)  # (cols, 3N): rows of the symmetric Hessian


def _check(h, h_fd, n, cols=None):
    """h: rows of the Hessian (of the atoms ``cols``, default all)."""
    scale = max(np.abs(h_fd).max(), 1.0)
    assert np.abs(h - h_fd).max() < 1e-4 * scale, np.abs(h - h_fd).max()
    cols = np.arange(n) if cols is None else np.asarray(cols)
    sub = h[:, (3 * cols[:, None] + np.arange(3)).reshape(-1)]  # the square block of those atoms
    assert np.abs(sub - sub.T).max() < 1e-8 * scale
    # acoustic sum rule: a rigid translation changes no force
    assert np.abs(h.reshape(h.shape[0], n, 3).sum(1)).max() < 1e-8 * scale


def test_hessian_si2_matches_finite_differences(model64):
    atoms = _si2()
    h = hessian(atoms, model64)
    assert h.shape == (6, 6) and h.dtype == np.float64
    _check(h, _fd_hessian(model64, atoms), 2)
    # both ways of taking the rows give the same matrix (vmap: slower on the CPU, 3 rows here)
    np.testing.assert_allclose(hessian(atoms, model64, method="vmap", chunk_size=2, indices=[1]),
                               h[3:], atol=1e-10, rtol=0)


def test_hessian_cif_matches_finite_differences(model64, cif_structures):
    s = cif_structures["LiMnO2"]
    idx = [0, 2, 5]  # Li, Mn, O: the rows of three atoms (each row costs one backward pass)
    h = hessian(s, model64, indices=idx)
    assert h.shape == (9, 24)
    from pymatgen.io.ase import AseAtomsAdaptor

    _check(h, _fd_hessian(model64, AseAtomsAdaptor.get_atoms(s), indices=idx), len(s), idx)


def test_gamma_frequencies_acoustic_modes(model64):
    atoms = _si2()
    h = hessian(atoms, model64)
    f = gamma_frequencies(atoms, model64, hessian_matrix=h)
    assert f.shape == (6,)
    assert np.abs(f[:3]).max() < 0.05  # THz: the three acoustic modes
    assert f[3:].min() > 5.0  # Si optical modes near 15 THz (rattled, CHGNet)


def test_hessian_float32_model_is_not_modified(model):
    atoms = _si2()
    h32 = hessian(atoms, model)  # the model's own dtype: float32
    assert next(model.parameters()).dtype == torch.float32
    h64 = hessian(atoms, model, dtype=torch.float64)  # a float64 copy
    assert next(model.parameters()).dtype == torch.float32
    assert np.abs(h32 - h64).max() < 1e-2 * np.abs(h64).max()


def test_hessian_rejects_direct_force_heads():
    net = fastchgnet.HeadsCHGNet(fastchgnet.CHGNetConfig(atom_fea_dim=8, bond_fea_dim=8,
                                                         angle_fea_dim=8, n_conv=2))
    with pytest.raises(ValueError, match="derivatives"):
        hessian(_si2(), net)
