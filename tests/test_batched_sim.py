"""Batched simulation (fastchgnet.sim): FIRE (+ cell filter) equals ASE's, in-flight
batching gives every structure its own trajectory, MD equals ASE's velocity Verlet and batched
MD equals one structure at a time, Langevin thermostat reaches its target temperatures."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import fastchgnet
from fastchgnet.data.prototypes import make
from fastchgnet.sim import BatchedMD, BatchPotential, atom_graph_of, relax
from fastchgnet.units import AMU_A2_FS2_EV


@pytest.fixture(scope="module")
def model64():
    return fastchgnet.load_model("0.3.0", dtype=torch.float64)


def _structs():
    return [make("rocksalt", ["Na", "Cl"], rattle=0.1, seed=1, strain=0.03),
            make("perovskite", ["Sr", "Ti", "O"], rattle=0.1, seed=2),
            make("bcc", ["Fe"], supercell=2, rattle=0.08, seed=3),
            make("fluorite", ["Ca", "F"], rattle=0.08, seed=4),
            make("zincblende", ["Ga", "As"], rattle=0.1, seed=5, strain=-0.02)]


def _ase_relax(model, structure, cell_filter, fmax, steps):
    from ase.filters import UnitCellFilter
    from ase.optimize import FIRE
    from pymatgen.io.ase import AseAtomsAdaptor

    from fastchgnet.md.calculator import CHGNetCalculator

    atoms = AseAtomsAdaptor.get_atoms(structure)
    atoms.calc = CHGNetCalculator(model, graph="host")
    opt = FIRE(UnitCellFilter(atoms) if cell_filter else atoms, logfile=None)
    opt.run(fmax=fmax, steps=steps)
    return atoms, opt.nsteps


@pytest.mark.parametrize("cell_filter", [False, True])
def test_fire_matches_ase(model64, cell_filter):
    structs = _structs()[:2]
    res = relax(model64, structs, fmax=0.05, steps=60, cell_filter=cell_filter)
    for s, r in zip(structs, res):
        atoms, n = _ase_relax(model64, s, cell_filter, 0.05, 60)
        assert r.converged and r.n_steps == n
        assert r.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(r.structure.cart_coords, atoms.positions, atol=1e-9)
        np.testing.assert_allclose(r.structure.lattice.matrix, atoms.cell[:], atol=1e-9)
        assert np.abs(r.forces).max() < 0.05 * 1.01
        assert type(r.structure) is type(s)
        # the one RelaxResult of both relaxers: real residuals, chgnet-style access
        assert r.fmax == pytest.approx(np.linalg.norm(r.forces, axis=1).max(), abs=1e-12)
        assert r.smax == (pytest.approx(np.abs(r.stress).max()) if cell_filter else 0.0)
        assert r["final_structure"] is r.structure and r.atoms is None


def test_in_flight_batching(model64):
    structs = _structs()
    seen: list[list[int]] = []
    res = relax(model64, structs, fmax=0.05, steps=40, cell_filter=True, max_structures=2,
                callback=lambda d: seen.append(d["ids"].tolist()))
    alone = [relax(model64, [s], fmax=0.05, steps=40, cell_filter=True)[0] for s in structs]
    for r, a in zip(res, alone):
        assert r.n_steps == a.n_steps and r.converged == a.converged
        assert r.energy == pytest.approx(a.energy, abs=1e-8)
        np.testing.assert_allclose(r.structure.cart_coords, a.structure.cart_coords, atol=1e-7)
    assert max(len(ids) for ids in seen) == 2
    # a structure entered while another one was in flight (the batch was refilled)
    batches = [tuple(ids) for ids in seen]
    assert any(len(set(a) & set(b)) == 1 for a, b in zip(batches, batches[1:]))
    assert set().union(*map(set, batches)) == set(range(len(structs)))


def test_max_atoms_bounds_the_batch(model64):
    structs = _structs()[:3]  # 8, 5 and 16 atoms
    seen = []
    relax(model64, structs, fmax=0.5, steps=3, max_atoms=16,
          callback=lambda d: seen.append(d["ids"].tolist()))
    sizes = [len(s) for s in structs]
    assert all(sum(sizes[i] for i in ids) <= 16 for ids in seen)


def test_relax_error_names_the_input_structure(model64):
    from pymatgen.core import Lattice, Structure

    bad = Structure(Lattice.cubic(4.0), ["Cu", "Cu"], [[0, 0, 0], [0.05, 0, 0]])
    structs = _structs()[:3] + [bad]
    with pytest.raises(ValueError, match="structure 3 has atoms 0 and 1"):
        relax(model64, structs, fmax=0.05, steps=5, max_structures=2)


# ------------------------------------------------------------------------------------------------
# molecular dynamics


def test_nve_matches_ase_velocity_verlet(model64):
    from ase import units
    from ase.md.verlet import VelocityVerlet
    from pymatgen.io.ase import AseAtomsAdaptor

    from fastchgnet.md.calculator import CHGNetCalculator

    s = _structs()[0]
    md = BatchedMD(model64, [s], timestep=2.0, init_temperature=600.0, seed=3)
    v0 = md.velocities.clone()
    md.run(10)
    atoms = AseAtomsAdaptor.get_atoms(s)
    atoms.calc = CHGNetCalculator(model64, graph="host")
    atoms.set_velocities(v0.numpy() / units.fs)  # Å/fs -> ASE units
    VelocityVerlet(atoms, timestep=2.0 * units.fs, logfile=None).run(10)
    np.testing.assert_allclose(md.gi.positions.numpy(), atoms.positions, atol=1e-9)
    np.testing.assert_allclose(md.velocities.numpy(), atoms.get_velocities() * units.fs, atol=1e-10)
    assert float(md.kinetic_energy[0]) == pytest.approx(atoms.get_kinetic_energy(), rel=1e-9)


def test_batched_md_equals_one_at_a_time_and_conserves_energy(model64):
    structs = _structs()[:3]
    md = BatchedMD(model64, structs, timestep=1.0, init_temperature=300.0, seed=0)
    v0 = md.velocities.clone()
    log = md.run(30, log_every=5)
    ag = atom_graph_of(md.gi.n_atoms, md.gi.positions.shape[0])
    for g, s in enumerate(structs):
        one = BatchedMD(model64, [s], timestep=1.0, velocities=v0[ag == g])
        one.run(30)
        np.testing.assert_allclose(one.gi.positions.numpy(), md.gi.positions[ag == g].numpy(),
                                   atol=1e-9)
    drift = np.abs(log["total_energy"] - log["total_energy"][0]).max(0)
    assert (drift < 2e-3 * np.array([len(s) for s in structs])).all(), drift
    assert (log["kinetic_energy"] > 0).all()


class _FreeParticles(BatchPotential):
    """No forces: the Langevin thermostat alone sets the velocities."""

    def __init__(self) -> None:
        self.n_calls = 0

    def __call__(self, gi, stress=True):
        g = gi.n_atoms.shape[0]
        out = {"energy": gi.positions.new_zeros(g), "forces": torch.zeros_like(gi.positions)}
        if stress:
            out["stress"] = gi.positions.new_zeros(g, 3, 3)
        return out

    def system(self, structures):
        from fastchgnet.data.device_graph import graph_inputs

        return graph_inputs(structures, dtype=torch.float64)


def test_langevin_reaches_each_target_temperature():
    structs = [make("fcc", ["Cu"], supercell=3), make("rocksalt", ["Li", "F"], supercell=2)]
    md = BatchedMD(_FreeParticles(), structs, timestep=2.0, ensemble="nvt_langevin",
                   temperature=[300.0, 1200.0], friction=0.05, init_temperature=0.0, seed=1)
    assert float(md.temperature_now.max()) == 0.0
    log = md.run(600)
    mean_t = log["temperature"][100:].mean(0)
    np.testing.assert_allclose(mean_t, [300.0, 1200.0], rtol=0.05)
    # Maxwell-Boltzmann initial velocities: temperature close to the request, no net momentum
    md2 = BatchedMD(_FreeParticles(), structs, timestep=1.0, init_temperature=500.0, seed=2)
    mom = torch.zeros(2, 3, dtype=torch.float64).index_add(
        0, atom_graph_of(md2.gi.n_atoms, md2.gi.positions.shape[0]),
        md2.velocities * md2.masses[:, None])
    assert float(mom.abs().max()) < 1e-12
    np.testing.assert_allclose(md2.temperature_now.numpy(), 500.0, rtol=0.3)
    assert AMU_A2_FS2_EV == pytest.approx(103.6427, rel=1e-6)


def test_bad_arguments(model64):
    with pytest.raises(ValueError, match="ensemble"):
        BatchedMD(model64, _structs()[:1], ensemble="npt")
    with pytest.raises(ValueError, match="temperature"):
        BatchedMD(model64, _structs()[:1], ensemble="nvt_langevin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BatchedMD(model64, _structs()[:1], ensemble="nve")


def test_ase_atoms_in_and_out(small_model):
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms.rattle(0.05, seed=0)
    before = atoms.positions.copy()
    (res,) = relax(small_model, [atoms], fmax=1e-9, steps=3)
    assert type(res.structure) is type(atoms) and res.n_steps == 3 and not res.converged
    assert res.atoms is res.structure and res.final_structure is None and res.steps == 3
    assert np.abs(res.structure.positions - before).max() > 0
    np.testing.assert_array_equal(atoms.positions, before)  # the input is not modified
