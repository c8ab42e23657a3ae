"""fastchgnet as a torch-sim model (fastchgnet.torchsim.FastCHGNetModel), tested with
torch-sim-atomistic 0.3.0."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ase.build import bulk

ts = pytest.importorskip("torch_sim")

import fastchgnet  # noqa: E402
from fastchgnet.sim.dynamics import BatchedMD  # noqa: E402
from fastchgnet.sim.fire import relax  # noqa: E402
from fastchgnet.torchsim import FastCHGNetModel  # noqa: E402
from fastchgnet.units import EV_A3_TO_GPA  # noqa: E402

from conftest import TOL32  # noqa: E402

CPU = torch.device("cpu")
FS_PER_TS_TIME = 1e3 / float(ts.units.MetalUnits.time)  # torch-sim's internal time unit, in fs


@pytest.fixture(scope="module")
def tsmodel(model):
    return FastCHGNetModel(model, device="cpu")


def _structures():
    """Small crystals with non-orthogonal cells (primitive fcc lattices), rattled."""
    out = [bulk("Si", "diamond", a=5.43), bulk("NaCl", "rocksalt", a=5.64),
           bulk("Cu", "fcc", a=3.61) * (2, 1, 1)]
    for k, a in enumerate(out):
        a.rattle(0.05, seed=k)
    return out


def _check_against_predict(model, tsmodel, state, structures):
    out = tsmodel(state)
    ref = fastchgnet.predict(model, structures, task="efsm")
    n = np.array([len(s) for s in structures])
    np.testing.assert_allclose(out["energy"].numpy(), np.array([r["e"] for r in ref]) * n,
                               atol=TOL32["e"] * n.max(), rtol=0)
    np.testing.assert_allclose(out["forces"].numpy(), np.concatenate([r["f"] for r in ref]),
                               atol=TOL32["f"], rtol=0)
    np.testing.assert_allclose(out["stress"].numpy() * EV_A3_TO_GPA,
                               np.stack([r["s"] for r in ref]), atol=TOL32["s"], rtol=0)
    np.testing.assert_allclose(out["magmoms"].numpy(), np.concatenate([r["m"] for r in ref]),
                               atol=TOL32["m"], rtol=0)
    assert out["energy"].shape == (len(structures),)
    assert out["stress"].shape == (len(structures), 3, 3)


def test_validate_model_outputs(tsmodel):
    from torch_sim.models.interface import validate_model_outputs

    validate_model_outputs(tsmodel, CPU, torch.float32)
    assert tsmodel.dtype == torch.float32 and tsmodel.device == CPU
    assert tsmodel.compute_forces and tsmodel.compute_stress
    assert tsmodel.memory_scales_with == "n_atoms_x_density"


def test_batched_outputs_equal_predict(model, tsmodel):
    structures = _structures()
    state = ts.io.atoms_to_state(structures, CPU, torch.float32)
    _check_against_predict(model, tsmodel, state, structures)
    # a state dict (torch-sim's StateDict) with the older per-atom index name "batch"
    d = {"positions": state.positions, "cell": state.cell, "atomic_numbers": state.atomic_numbers,
         "batch": state.system_idx, "pbc": state.pbc}
    np.testing.assert_allclose(tsmodel(d)["energy"].numpy(), tsmodel(state)["energy"].numpy(),
                               rtol=0, atol=1e-6)
    # a float64 state is cast to the model's dtype
    assert tsmodel(ts.io.atoms_to_state(structures, CPU, torch.float64))["energy"].dtype == torch.float32


def test_cifs_equal_predict(model, tsmodel, cif_structures):
    structures = list(cif_structures.values())
    state = ts.io.structures_to_state(structures, CPU, torch.float32)
    _check_against_predict(model, tsmodel, state, structures)


def test_skin_reuse_and_flags(model):
    structures = _structures()
    state = ts.io.atoms_to_state(structures, CPU, torch.float32)
    m = FastCHGNetModel(model, skin=1.0)
    m(state)
    moved = state.clone()
    moved.positions = moved.positions + 0.05 * torch.randn(moved.positions.shape,
                                                           generator=torch.Generator().manual_seed(0))
    reused = m(moved)
    assert m.verlet.n_builds == 1  # the neighbour list of the first call was reused
    fresh = FastCHGNetModel(model, skin=0.0)(moved)
    torch.testing.assert_close(reused["forces"], fresh["forces"], atol=1e-5, rtol=0)
    m.compute_stress = False
    m.compute_magmoms = False
    assert set(m(state)) == {"energy", "forces"}


def test_batched_fire_matches_our_relax(model, tsmodel):
    """torch-sim's FIRE (ASE flavour, positions only) and fastchgnet.sim.fire.relax reach the
    same minima: final energies within 2 meV/atom."""
    structures = _structures()
    for a in structures:
        a.rattle(0.1, seed=7)
    fmax = 0.03
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = ts.optimize(ts.io.atoms_to_state(structures, CPU, torch.float32), tsmodel,
                            optimizer=ts.optimizers.fire,
                            convergence_fn=ts.generate_force_convergence_fn(
                                fmax, include_cell_forces=False),
                            max_steps=400)
    ours = relax(model, structures, fmax=fmax, steps=400)
    n = np.array([len(a) for a in structures])
    e_ts = tsmodel(final)["energy"].numpy() / n
    e_ours = np.array([r.energy for r in ours]) / n
    f = tsmodel(final)["forces"].norm(dim=1)
    assert float(f.max()) < 2 * fmax
    np.testing.assert_allclose(e_ts, e_ours, atol=2e-3, rtol=0)


def test_nvt_langevin_agrees_with_batched_md(model, tsmodel):
    """A short NVT Langevin run (BAOAB in both) of the same structures, 300 K, 2 fs, friction
    0.01/fs, Maxwell-Boltzmann start, 25 steps: torch-sim and fastchgnet's BatchedMD use different
    random numbers, so 'agree' is statistical: the mean kinetic temperature after the first 5
    steps is within 75-450 K in both (from the perfect lattice, equipartition first halves the
    kinetic temperature to ~150 K; the thermostat's 100 fs time restores it slowly), both potential energies rise above the minimum, and the
    mean potential energy per atom of each structure agrees within 15 meV/atom (the thermal rise
    at equipartition is 3/2 kT = 39 meV/atom)."""
    structures = [bulk("Si", "diamond", a=5.43, cubic=True), bulk("NaCl", "rocksalt", a=5.64)]
    n_steps, dt_fs, temp, friction = 25, 2.0, 300.0, 0.01
    state = ts.io.atoms_to_state(structures, CPU, torch.float32)
    kt = torch.tensor(temp * float(ts.units.MetalUnits.temperature))
    init_fn, update_fn = ts.nvt_langevin(
        tsmodel, dt=torch.tensor(dt_fs / FS_PER_TS_TIME), kT=kt,
        gamma=torch.tensor(friction * FS_PER_TS_TIME), seed=1)
    md = init_fn(state)
    n = torch.tensor([len(a) for a in structures])
    e_ts, t_ts = [], []
    for _ in range(n_steps):
        md = update_fn(md, kT=kt)
        e_ts.append(md.energy / n)
        t_ts.append(ts.quantities.calc_temperature(masses=md.masses, momenta=md.momenta,
                                                   system_idx=md.system_idx))
    e_ts, t_ts = torch.stack(e_ts).numpy(), torch.stack(t_ts).numpy()

    ours = BatchedMD(model, structures, timestep=dt_fs, ensemble="nvt_langevin", temperature=temp,
                     friction=friction, seed=1)
    log = ours.run(n_steps)
    e_ours = log["potential_energy"] / n.numpy()
    print("mean T (torch-sim, ours):", t_ts[5:].mean(), log["temperature"][5:].mean())
    print("mean Epot/atom (torch-sim, ours):", e_ts.mean(0), e_ours.mean(0))
    for t in (t_ts, log["temperature"]):
        assert np.isfinite(t).all() and 75 < t[5:].mean() < 450
    assert np.isfinite(e_ts).all()
    e0 = tsmodel(state)["energy"].numpy() / n.numpy()
    assert (e_ts.mean(0) > e0).all() and (e_ours.mean(0) > e0).all()  # heated from the minimum
    np.testing.assert_allclose(e_ts.mean(0), e_ours.mean(0), atol=0.015, rtol=0)
    # torch-sim's runner (timestep in ps) on the same model
    final = ts.integrate(state, tsmodel, integrator=ts.nvt_langevin, n_steps=3, temperature=temp,
                         timestep=dt_fs * 1e-3, seed=2)
    assert torch.isfinite(final.positions).all() and final.energy.shape == (2,)
