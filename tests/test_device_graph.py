"""Graphs built on the device (fastchgnet.data.device_graph) against the host graphs.

The device graph must give the same bond set (same canonical direction and images) and the same
angle set as build_graph + collate, and therefore the same model outputs; a Verlet list reused
over an MD-like sequence must give exactly the graphs of fresh builds.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

import fastchgnet
from fastchgnet.data import build_graph, collate
from fastchgnet.data.device_graph import (VerletGraph, device_batch, device_graph, graph_inputs,
                                          make_builder, neighbor_pairs)
from fastchgnet.data.prototypes import make, random_structures

from conftest import small_config


@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(0)
    net = fastchgnet.CHGNet(small_config()).double()
    with torch.no_grad():
        net.atom_ref.copy_(torch.linspace(-5.0, -1.0, net.atom_ref.numel()))
    return net.eval()


def _structures() -> list[Structure]:
    """Mixed sizes, non-orthogonal cells, and small cells where 6 Å spans many images."""
    tiny_tri = Structure(Lattice.from_parameters(2.6, 2.9, 3.1, 71, 82, 103), ["Si"], [[0, 0, 0]])
    two_tri = Structure(Lattice.from_parameters(3.3, 3.6, 4.4, 62, 75, 95), ["Li", "O"],
                        [[0, 0, 0], [0.45, 0.52, 0.49]])
    # a thin, strongly sheared cell: one short axis, a long one
    sheared = Structure(Lattice([[2.7, 0, 0], [2.3, 2.6, 0], [1.1, 0.9, 8.5]]), ["Al", "Al"],
                        [[0, 0, 0], [0.5, 0.5, 0.3]])
    return [tiny_tri, two_tri, sheared, *random_structures(5, seed=3, max_atoms=32),
            make("perovskite", ["Sr", "Ti", "O"], supercell=2, rattle=0.05, seed=2)]


def _bond_keys(b) -> list[tuple]:
    k = torch.cat([b.bond_src[:, None], b.bond_dst[:, None], b.bond_image.round().long()], 1)
    return sorted(map(tuple, k.tolist()))


def _angle_keys(b) -> list[tuple]:
    """Angles as (centre, leg-1 bond, leg-2 bond, sign) with the bonds spelled out."""
    def bond(u):
        return [b.bond_src[u], b.bond_dst[u], *b.bond_image[u].round().long().T]

    cols = [b.angle_center, *bond(b.angle_bond1), *bond(b.angle_bond2), b.angle_sign.round().long()]
    return sorted(map(tuple, torch.stack(cols, 1).tolist()))


def _same_graph(a, b) -> None:
    assert a.num_bonds == b.num_bonds and a.num_angles == b.num_angles
    for x in (a, b):  # both list the angles' rows, and the legs renumbered into them
        assert torch.equal(x.angle_rows[x.angle_row1], x.angle_bond1)
        assert torch.equal(x.angle_rows[x.angle_row2], x.angle_bond2)
    assert _bond_keys(a) == _bond_keys(b)
    assert _angle_keys(a) == _angle_keys(b)
    torch.testing.assert_close(a.bond_graph.sort().values, b.bond_graph.sort().values, rtol=0, atol=0)


def _same_outputs(model, a, b, tol=1e-10) -> None:
    oa = model(a, task="efsm", return_site_energies=True)
    ob = model(b, task="efsm", return_site_energies=True)
    for k in ("e", "f", "s", "m", "site_energies"):
        torch.testing.assert_close(oa[k].detach(), ob[k].detach(), rtol=0, atol=tol, msg=k)


@pytest.mark.parametrize("i", range(9))
def test_same_graph_and_outputs_as_host(model64, i):
    s = _structures()[i]
    host = collate([build_graph(s)], torch.float64)
    dev = device_batch([s], dtype=torch.float64)
    _same_graph(host, dev)
    _same_outputs(model64, host, dev)


def test_mixed_batch(model64):
    structs = _structures()
    host = collate([build_graph(s) for s in structs], torch.float64)
    dev = device_batch(structs, dtype=torch.float64)
    _same_graph(host, dev)
    _same_outputs(model64, host, dev)


def test_float32_outputs(small_model):
    structs = _structures()[:4]
    host = collate([build_graph(s) for s in structs], torch.float32)
    dev = device_batch(structs, dtype=torch.float32)
    _same_graph(host, dev)
    _same_outputs(small_model, host, dev, tol=1e-5)


def test_few_hundred_atoms(model64):
    s = make("rocksalt", ["Na", "Cl"], supercell=(4, 4, 3), rattle=0.08, seed=4)  # 384 atoms
    assert len(s) == 384
    host = collate([build_graph(s)], torch.float64)
    dev = device_graph(*(lambda g: (g.atomic_numbers, g.positions, g.lattice, g.n_atoms, g.pbc))(
        graph_inputs([s], dtype=torch.float64)), chunk=4096)  # several chunks
    _same_graph(host, dev)
    _same_outputs(model64, host, dev)


def test_non_periodic_axis(model64):
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=1)
    atoms.pbc = (True, True, False)
    host = collate([build_graph(atoms)], torch.float64)
    dev = device_batch([atoms], dtype=torch.float64)
    _same_graph(host, dev)
    _same_outputs(model64, host, dev)


def test_neighbor_pairs_brute_force():
    """All pairs within the cutoff, checked against an explicit loop over images."""
    s = Structure(Lattice.from_parameters(3.1, 3.4, 3.9, 70, 84, 101), ["Li", "O", "O"],
                  [[0, 0, 0], [0.4, 0.45, 0.55], [0.8, 0.1, 0.3]])
    gi = graph_inputs([s], dtype=torch.float64)
    cut = 5.0
    src, dst, img = neighbor_pairs(gi.positions, gi.lattice, torch.zeros(3, dtype=torch.long),
                                   gi.n_atoms, gi.pbc, cut)
    got = set(map(tuple, torch.cat([src[:, None], dst[:, None], img], 1).tolist()))
    pos, lat = s.cart_coords, s.lattice.matrix
    want = set()
    rng = range(-5, 6)
    for i in range(3):
        for j in range(3):
            for n in np.array(np.meshgrid(rng, rng, rng)).reshape(3, -1).T:
                d = np.linalg.norm(pos[i] - pos[j] - n @ lat)
                first = next((c for c in n if c != 0), 0)
                if d <= cut and (i < j or (i == j and first > 0)):
                    want.add((i, j, *map(int, n)))
    assert got == want and len(got) > 50


# --------------------------------------------------------------------------------------------
# Verlet skin


def _md_like(structs, steps, seed, cell_noise=0.0, step_size=0.04):
    gi = graph_inputs(structs, dtype=torch.float64)
    rng = np.random.default_rng(seed)
    pos, lat = gi.positions.clone(), gi.lattice.clone()
    for _ in range(steps):
        pos = pos + torch.from_numpy(rng.normal(scale=step_size, size=tuple(pos.shape)))
        if cell_noise:
            strain = torch.from_numpy(rng.normal(scale=cell_noise, size=(len(structs), 3, 3)))
            strain = 0.5 * (strain + strain.transpose(1, 2))
            eye = torch.eye(3, dtype=torch.float64)
            ag = torch.repeat_interleave(torch.arange(len(structs)), gi.n_atoms)
            pos = torch.bmm(pos.unsqueeze(1), (eye + strain)[ag]).squeeze(1)
            lat = torch.bmm(lat, eye + strain)
        yield gi, pos, lat


@pytest.mark.parametrize("cell_noise", [0.0, 0.003])
def test_verlet_reuse_equals_fresh(model64, cell_noise):
    structs = _structures()[:5]
    vg = VerletGraph(skin=0.8)
    for gi, pos, lat in _md_like(structs, 15, seed=1, cell_noise=cell_noise):
        reused = vg.update(gi.atomic_numbers, pos, lat, gi.n_atoms, gi.pbc)
        fresh = device_graph(gi.atomic_numbers, pos, lat, gi.n_atoms, gi.pbc)
        _same_graph(reused, fresh)
    _same_outputs(model64, reused, fresh)
    host = collate([build_graph(Structure(Lattice(lat[i].numpy()), s.species,
                                          pos[gi.n_atoms[:i].sum():gi.n_atoms[:i + 1].sum()].numpy(),
                                          coords_are_cartesian=True))
                    for i, s in enumerate(structs)], torch.float64)
    _same_graph(reused, host)
    assert 1 <= vg.n_builds < vg.n_calls == 15  # the list was reused


def test_verlet_rebuilds_when_needed():
    s = make("fcc", ["Cu"], supercell=2)
    gi = graph_inputs([s], dtype=torch.float64)
    vg = VerletGraph(skin=1.0)
    vg.update(gi.atomic_numbers, gi.positions, gi.lattice, gi.n_atoms)
    pos = gi.positions.clone()
    pos[0, 0] += 0.45  # below skin / 2: reuse
    vg.update(gi.atomic_numbers, pos, gi.lattice, gi.n_atoms)
    assert vg.n_builds == 1
    pos[0, 0] += 0.1  # now 0.55 > skin / 2: rebuild
    vg.update(gi.atomic_numbers, pos, gi.lattice, gi.n_atoms)
    assert vg.n_builds == 2
    # a uniform 3 % expansion only lengthens pairs: no pair can enter the cutoff, no rebuild
    b = vg.update(gi.atomic_numbers, pos * 1.03, gi.lattice * 1.03, gi.n_atoms)
    assert vg.n_builds == 2
    _same_graph(b, device_graph(gi.atomic_numbers, pos * 1.03, gi.lattice * 1.03, gi.n_atoms))
    # a 15 % compression brings pairs from 7 Å to 5.95 Å: must rebuild
    b = vg.update(gi.atomic_numbers, pos * 0.85 * 1.03, gi.lattice * 0.85 * 1.03, gi.n_atoms)
    assert vg.n_builds == 3
    vg.update(gi.atomic_numbers, pos * 1.03, gi.lattice * 1.03, gi.n_atoms)
    assert vg.n_builds == 4
    # wrapping atoms into the cell is not a displacement
    inv = torch.linalg.inv(gi.lattice[0] * 1.03)
    frac = (pos * 1.03) @ inv
    frac[:4] += torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    wrapped = frac @ (gi.lattice[0] * 1.03)
    b = vg.update(gi.atomic_numbers, wrapped, gi.lattice * 1.03, gi.n_atoms)
    assert vg.n_builds == 4
    _same_graph(b, device_graph(gi.atomic_numbers, wrapped, gi.lattice * 1.03, gi.n_atoms))
    # other atoms: rebuild
    z = gi.atomic_numbers.clone()
    z[0] = 28
    vg.update(z, wrapped, gi.lattice * 1.03, gi.n_atoms)
    assert vg.n_builds == 5


@contextlib.contextmanager
def count_host_syncs():
    """Count the Tensor methods that copy values to the host (works on CPU)."""
    names = ["item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
             "nonzero"]
    saved = {n: getattr(torch.Tensor, n) for n in names}
    counter = {"n": 0}

    def wrap(fn):
        def f(self, *a, **k):
            counter["n"] += 1
            return fn(self, *a, **k)
        return f

    saved_nonzero = torch.nonzero
    try:
        for n in names:
            setattr(torch.Tensor, n, wrap(saved[n]))
        torch.nonzero = wrap(saved_nonzero)
        yield counter
    finally:
        for n, v in saved.items():
            setattr(torch.Tensor, n, v)
        torch.nonzero = saved_nonzero


def test_one_host_sync_per_step():
    structs = _structures()[:4]
    gi = graph_inputs(structs, dtype=torch.float64)
    vg = VerletGraph(skin=1.0)
    vg.update(gi.atomic_numbers, gi.positions, gi.lattice, gi.n_atoms, gi.pbc)
    pos = gi.positions + 0.01
    with count_host_syncs() as c:
        vg.update(gi.atomic_numbers, pos, gi.lattice, gi.n_atoms, gi.pbc)
    assert vg.n_builds == 1
    assert c["n"] == 1
    with count_host_syncs() as c:
        vg.reset()
        vg.update(gi.atomic_numbers, pos, gi.lattice, gi.n_atoms, gi.pbc)
    assert c["n"] == 4  # grid shape, candidate count, candidates kept, then the step's one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_syncs_once():
    structs = _structures()
    gi = graph_inputs(structs, device="cuda", dtype=torch.float64)
    vg = VerletGraph(skin=1.0)
    b = vg.update(gi.atomic_numbers, gi.positions, gi.lattice, gi.n_atoms, gi.pbc)
    _same_graph(b.to("cpu"), device_batch(structs, dtype=torch.float64))
    pos = gi.positions + 0.01
    torch.cuda.synchronize()
    import warnings

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            vg.update(gi.atomic_numbers, pos, gi.lattice, gi.n_atoms, gi.pbc)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in rec if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


# --------------------------------------------------------------------------------------------
# bad input


def test_errors_name_the_structure():
    ok = make("fcc", ["Cu"])
    close = Structure(Lattice.cubic(4.0), ["Cu", "Cu"], [[0, 0, 0], [0.05, 0, 0]])
    with pytest.raises(ValueError, match=r"structure 1 has atoms 0 and 1 only 0\.2000 Å apart"):
        device_batch([ok, close], dtype=torch.float64)
    lonely = Structure(Lattice.cubic(14.0), ["Cu"], [[0, 0, 0]])
    with pytest.raises(ValueError, match=r"structure 1 has isolated atoms \(1 in the batch.*e\.g\. atom 0"):
        device_batch([ok, lonely], dtype=torch.float64)
    b = device_batch([ok, lonely], dtype=torch.float64, on_isolated_atoms="ignore")
    assert b.num_graphs == 2
    gi = graph_inputs([ok], dtype=torch.float64)
    z = gi.atomic_numbers.clone()
    z[2] = 99
    with pytest.raises(ValueError, match="structure 0 has an element .* 99 at atom 2"):
        device_graph(z, gi.positions, gi.lattice, gi.n_atoms)
    pos = gi.positions.clone()
    pos[1, 0] = float("nan")
    with pytest.raises(ValueError, match="structure 0 has a non-finite"):
        device_graph(gi.atomic_numbers, pos, gi.lattice, gi.n_atoms)


def test_make_builder_for_a_calculator(small_model):
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.43).repeat(2)
    atoms.rattle(0.02, seed=0)
    builder = make_builder(small_model, skin=0.5)
    first = atoms.copy()
    b1 = builder(atoms)
    atoms.positions[3] += 0.05
    b2 = builder(atoms)
    assert builder.verlet.n_builds == 1 and b2.dtype == torch.float32
    _same_graph(b2, collate([build_graph(atoms)], torch.float32))
    _same_graph(b1, collate([build_graph(first)], torch.float32))


def test_builder_error_names_the_formula(small_model):
    close = Structure(Lattice.cubic(4.0), ["Cu", "Ni"], [[0, 0, 0], [0.05, 0, 0]])
    with pytest.raises(ValueError, match="structure Cu1Ni1 has atoms 0 and 1 only"):
        make_builder(small_model)(close)
