"""Relaxation and molecular dynamics: physics checks (energy conservation, relaxation to a stress
free cell), every ensemble, files flushed per log interval (also under SIGKILL), bad input, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.io import read

from fastchgnet.cli import main
from fastchgnet.md.calculator import CHGNetCalculator
from fastchgnet.md.dynamics import ENSEMBLES, MolecularDynamics, estimate_bulk_modulus, nve_energy_drift
from fastchgnet.md.relax import StructOptimizer

REPO = Path(__file__).resolve().parents[1]
STRAIN = np.array([[0.03, 0.01, 0.0], [0.01, -0.02, 0.005], [0.0, 0.005, 0.015]])


@pytest.fixture(scope="module")
def calc():
    """CHGNet 0.3.0 (float32, exact model) as an ASE calculator."""
    return CHGNetCalculator("0.3.0", device="cpu")


def si8(a: float = 5.43, rattle: float = 0.0, seed: int = 0):
    atoms = bulk("Si", "diamond", a=a, cubic=True)
    if rattle:
        atoms.rattle(rattle, seed=seed)
    return atoms


def strained_si8():
    atoms = si8()
    atoms.set_cell(atoms.cell[:] @ (np.eye(3) + STRAIN), scale_atoms=True)
    atoms.rattle(0.05, seed=1)
    return atoms


# ----------------------------------------------------------------------------------------------
# physics checks


def test_nve_energy_conservation_short(calc):
    """8-atom Si, 1 fs, 400 steps (0.4 ps) at ~300 K, float32 exact model: the total energy
    neither drifts (≤ 1 meV/atom/ps, the 10 ps target) nor fluctuates by more than 0.5 meV/atom.
    A force that is not -dE/dx (wrong sign, missing term) breaks both by orders of magnitude."""
    r = nve_energy_drift(si8(rattle=0.02), calc, steps=400, timestep=1.0, temperature=300.0, seed=0)
    assert 150 < r["mean_T"] < 600
    assert abs(r["drift"]) <= 1.0, r
    assert r["max_dev"] <= 0.5, r


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FASTCHGNET_LONG_MD"),
                    reason="10 ps NVE run (~10-25 min on one core): set FASTCHGNET_LONG_MD=1")
def test_nve_energy_drift_10ps(calc):
    """The issue's check: 64-atom Si, 1 fs, 10 ps (10,000 steps), float32 exact model:
    drift ≤ 1 meV/atom/ps."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)
    fast = CHGNetCalculator(calc.model, task="ef")
    r = nve_energy_drift(atoms, fast, steps=10_000, timestep=1.0, temperature=300.0, seed=0)
    assert abs(r["drift"]) <= 1.0, r


@pytest.mark.parametrize("optimizer", ["FIRE", "BFGS"])
def test_relax_strained_cell(calc, optimizer):
    """A sheared, rattled Si cell relaxes to max|F| ≤ 0.05 eV/Å and max|σ| < 0.1 GPa; the
    criteria hold when re-evaluated by a fresh calculator, and the cell returns to cubic."""
    res = StructOptimizer(calc, optimizer).relax(strained_si8(), fmax=0.05, smax=0.1, steps=300)
    assert res.converged and res.fmax <= 0.05 and res.smax < 0.1
    check = res.atoms.copy()
    check.calc = CHGNetCalculator(calc.model)
    assert np.linalg.norm(check.get_forces(), axis=1).max() <= 0.05
    assert np.abs(check.get_stress()).max() / units.GPa < 0.1
    a, b, c, alpha, beta, gamma = check.cell.cellpar()
    assert max(a, b, c) - min(a, b, c) < 0.02 and max(abs(x - 90) for x in (alpha, beta, gamma)) < 0.5
    assert res["final_structure"].site_properties["magmom"] is not None
    assert len(res.trajectory) >= 2 and res.trajectory.energies[-1] < res.trajectory.energies[0]


def test_relax_positions_only_and_files(calc, tmp_path):
    atoms = strained_si8()
    cell = atoms.cell[:].copy()
    res = StructOptimizer(calc).relax(atoms, fmax=0.05, relax_cell=False, loginterval=2,
                                      trajectory=tmp_path / "r.traj", logfile=tmp_path / "r.log")
    assert res.converged and res.atoms is atoms and res.structure is atoms
    np.testing.assert_allclose(atoms.cell[:], cell)
    # the RelaxResult shared with fastchgnet.sim.relax: final forces and stress too
    np.testing.assert_allclose(res.forces, atoms.get_forces())
    assert res.stress.shape == (3, 3) and res.n_steps == res.steps and res.smax == 0.0
    assert np.linalg.norm(res.forces, axis=1).max() == pytest.approx(res.fmax)
    frames = read(tmp_path / "r.traj", ":")
    rows = np.loadtxt(tmp_path / "r.log", ndmin=2)
    assert len(frames) == len(rows) == len(res.trajectory)
    assert rows[-1, 0] == res.steps and rows[-1, 2] <= 0.05
    np.testing.assert_allclose(frames[-1].positions, atoms.positions, atol=1e-6)


def test_relax_structure_from_pymatgen(calc):
    """A pymatgen Structure goes in; the relaxed Structure comes back with magnetic moments."""
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    from fastchgnet.md.relax import relax_structure

    res = relax_structure(AseAtomsAdaptor.get_structure(strained_si8()), calc, optimizer="BFGS",
                          fmax=0.05)
    assert res.converged
    assert isinstance(res.final_structure, Structure) and len(res.final_structure) == 8
    np.testing.assert_allclose(res.final_structure.lattice.matrix, res.atoms.cell[:], atol=1e-8)
    assert len(res.final_structure.site_properties["magmom"]) == 8
    assert res.structure is res.final_structure  # the input's type


def test_relax_bad_options(calc):
    with pytest.raises(ValueError, match="optimizer"):
        StructOptimizer(calc, "Newton")
    with pytest.raises(ValueError, match="filter"):
        StructOptimizer(calc).relax(si8(), cell_filter="NoSuchFilter")
    n = calc.n_calls
    # keywords the optimiser does not take fail before anything runs; chgnet's names are explained
    with pytest.raises(TypeError, match=r"save_path: fastchgnet writes the trajectory with trajectory="):
        StructOptimizer(calc).relax(si8(), save_path="relax.pkl")
    with pytest.raises(TypeError, match=r"ase_filter: fastchgnet calls this cell_filter="):
        StructOptimizer(calc).relax(si8(), ase_filter="FrechetCellFilter")
    with pytest.raises(TypeError, match=r"maxstepp.*FIRE, which takes .*'maxstep'"):
        StructOptimizer(calc).relax(si8(), maxstepp=0.1)
    with pytest.raises(TypeError, match=r"use_device: fastchgnet calls this device="):
        StructOptimizer("0.3.0", use_device="cpu")
    assert calc.n_calls == n
    res = StructOptimizer(calc, "BFGS").relax(si8(rattle=0.02), steps=2, maxstep=0.05)  # accepted
    assert res.steps <= 2


def test_relax_progress_lines(calc, capsys):
    """verbose=0: a progress line per step on stderr (step, energy, max|F|, max|s|); the
    default prints nothing."""
    StructOptimizer(calc).relax(strained_si8(), steps=3, fmax=1e-6)
    assert capsys.readouterr().err == ""
    StructOptimizer(calc).relax(strained_si8(), steps=3, fmax=1e-6, verbose=0)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("relax Si8: step 3/3 (100%)")
    assert all("eV/atom" in x and "max|F|" in x and "max|s|" in x for x in lines)
    with pytest.raises(ValueError, match="verbose"):
        StructOptimizer(calc).relax(si8(), verbose=-1)


def test_bulk_modulus_estimate(calc):
    """Si: CHGNet 0.3.0 gives roughly the DFT bulk modulus (~90 GPa)."""
    atoms = si8()
    atoms.calc = calc
    assert 60 < estimate_bulk_modulus(atoms) < 130


# ----------------------------------------------------------------------------------------------
# ensembles and files


CASES = [(ens, th) for ens, ths in ENSEMBLES.items() for th in ths]


@pytest.mark.parametrize("ensemble,thermostat", CASES)
def test_ensembles(calc, tmp_path, ensemble, thermostat):
    """Every ensemble runs; frames and log rows are written at steps 0, k, 2k, ...; NVE/NVT keep
    the cell, NPT moves it; thermostats pull a hot start towards the target."""
    traj, log = tmp_path / "md.traj", tmp_path / "md.log"
    th = None if thermostat == "none" else thermostat
    md = MolecularDynamics(si8(rattle=0.02), model=calc, ensemble=ensemble, thermostat=th,
                           temperature=300, starting_temperature=300, timestep=2.0, taut=10.0,
                           taup=100.0, pressure=5.0, bulk_modulus=90.0, trajectory=traj,
                           logfile=log, loginterval=3, seed=1)
    v0 = md.atoms.get_volume()
    with md:
        md.run(12)
    frames = read(traj, ":")
    rows = np.loadtxt(log, ndmin=2)
    assert len(frames) == len(rows) == 5
    np.testing.assert_array_equal(rows[:, 0], [0, 3, 6, 9, 12])
    np.testing.assert_allclose(rows[:, 1], rows[:, 0] * 2e-3)
    np.testing.assert_allclose(rows[:, 2], rows[:, 3] + rows[:, 4], atol=1e-5)
    assert np.isfinite(rows).all() and (rows[1:, 5] > 10).all()
    np.testing.assert_allclose(frames[-1].positions, md.atoms.positions, atol=1e-6)
    assert frames[-1].calc.results["forces"].shape == (8, 3)
    if ensemble == "npt":
        assert abs(md.atoms.get_volume() - v0) > 1e-3  # 5 GPa compresses the cell
    else:
        assert md.atoms.get_volume() == pytest.approx(v0, rel=1e-12)


def test_extxyz_trajectory_and_append(calc, tmp_path):
    path = tmp_path / "md.extxyz"
    with MolecularDynamics(si8(rattle=0.02), model=calc, ensemble="nve", trajectory=path,
                           logfile=tmp_path / "md.log", loginterval=2) as md:
        md.run(4)
    with MolecularDynamics(md.atoms, model=calc, ensemble="nve", trajectory=path, append=True,
                           logfile=tmp_path / "md.log", loginterval=2) as md2:
        md2.run(2)
    frames = read(path, ":")
    assert len(frames) == 3 + 2
    assert "forces" in frames[0].calc.results
    assert len(np.loadtxt(tmp_path / "md.log", ndmin=2)) == 5


def test_bad_ensemble_options(calc):
    with pytest.raises(ValueError, match="ensemble"):
        MolecularDynamics(si8(), model=calc, ensemble="nph")
    with pytest.raises(ValueError, match="thermostat"):
        MolecularDynamics(si8(), model=calc, ensemble="nvt", thermostat="mtk")
    with pytest.raises(TypeError, match="use_device: fastchgnet calls this device="):
        MolecularDynamics(si8(), model="0.3.0", use_device="cpu")
    with pytest.raises(TypeError, match="bogus: unknown"):
        MolecularDynamics(si8(), model=calc, bogus=1)


def test_md_defaults_and_progress(calc, capsys):
    """Our own defaults (stated in docs/md.md): NVT Langevin, 1 fs, taut 100 fs; progress lines
    only with verbose, the last one at the last step."""
    from ase.md.langevin import Langevin

    md = MolecularDynamics(si8(rattle=0.02), model=calc)
    assert isinstance(md.dyn, Langevin) and md.timestep == 1.0 and md.taut == 100.0
    md.run(2)
    assert capsys.readouterr().err == ""
    md = MolecularDynamics(si8(rattle=0.02), model=calc, starting_temperature=300, seed=0,
                           verbose=0)
    md.run(3)
    md.run(2)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 + 2, lines  # steps 0-3, then 4-5 (each run reports its own steps)
    assert lines[3].startswith("md NVT Si8: step 3/3 (100%) T ") and "eV/atom" in lines[3]
    assert lines[-1].startswith("md NVT Si8: step 5/5 (100%)")


_KILL_SCRIPT = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from ase.build import bulk
from fastchgnet.md.dynamics import MolecularDynamics
atoms = bulk("Si", "diamond", a=5.43, cubic=True)
atoms.rattle(0.02, seed=0)
md = MolecularDynamics(atoms, model="0.3.0", device="cpu", ensemble="nvt", starting_temperature=300,
                       trajectory=sys.argv[1], logfile=sys.argv[2], loginterval=5, seed=0)
md.attach(lambda: md.nsteps == 23 and os.kill(os.getpid(), signal.SIGKILL))
md.run(100)
"""


def test_sigkill_loses_at_most_one_log_interval(tmp_path):
    """A process killed at step 23 (log interval 5) leaves readable files with the frames and log
    rows of steps 0, 5, 10, 15 and 20."""
    traj, log = tmp_path / "k.traj", tmp_path / "k.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILL_SCRIPT), str(traj), str(log)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    frames = read(traj, ":")
    rows = np.loadtxt(log, ndmin=2)
    assert len(frames) == 5 and len(rows) == 5
    np.testing.assert_array_equal(rows[:, 0], [0, 5, 10, 15, 20])


# ----------------------------------------------------------------------------------------------
# bad input


def test_npt_cell_collapse_is_a_clear_error(calc, tmp_path):
    """An absurd external pressure (1000 GPa) collapses the cell: the run stops with a ValueError
    naming the step, and the trajectory holds every frame before it."""
    md = MolecularDynamics(si8(), model=calc, ensemble="npt", thermostat="berendsen",
                           starting_temperature=300, pressure=1000.0, taup=50.0, bulk_modulus=90.0,
                           trajectory=tmp_path / "c.traj", loginterval=1, seed=0)
    with pytest.raises(ValueError, match=r"collapsed at MD step \d+") as err:
        md.run(200)
    md.close()
    step = int(str(err.value).split("MD step ")[1].split(":")[0])
    assert 1 < step < 200
    assert len(read(tmp_path / "c.traj", ":")) == step  # steps 0 .. step-1


def test_npt_cell_blown_up_in_one_step(calc):
    """A barostat step that wrecks the cell at once (the model then sees isolated atoms) is
    reported as a broken cell, not only as isolated atoms."""
    md = MolecularDynamics(si8(), model=calc, ensemble="npt", thermostat="berendsen",
                           starting_temperature=300, pressure=500.0, taup=20.0, bulk_modulus=1.0,
                           seed=0)
    with pytest.raises(ValueError, match=r"cell (collapsed|blew up|flattened) at MD step 1"):
        md.run(5)


def test_md_isolated_atoms(calc):
    from ase import Atoms

    atoms = Atoms("Si2", positions=[[0, 0, 0], [9, 9, 9]], cell=np.eye(3) * 18, pbc=True)
    md = MolecularDynamics(atoms, model=calc.model, ensemble="nve")
    with pytest.raises(ValueError, match=r"MD step 0.*isolated"):
        md.run(2)


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_relax_and_md(tmp_path, capsys):
    cif = tmp_path / "Si.cif"
    strained_si8().write(cif)
    assert main(["relax", str(cif), "--device", "cpu", "--fmax", "0.05", "--out",
                 str(tmp_path / "rel")]) == 0
    captured = capsys.readouterr()
    assert "yes" in captured.out and "Si" in captured.out
    assert "relax Si8: step 0/500" in captured.err  # progress lines on stderr
    relaxed = tmp_path / "rel" / "Si.cif"  # named after the input's stem
    for suffix in (".cif", ".extxyz", ".traj", ".log"):
        assert relaxed.with_suffix(suffix).is_file(), suffix

    assert main(["md", str(relaxed), "--device", "cpu", "--ensemble", "nvt", "--temperature", "300",
                 "--timestep", "1", "--steps", "4", "--loginterval", "2", "--out",
                 str(tmp_path / "md")]) == 0
    assert len(read(tmp_path / "md" / "Si.traj", ":")) == 3
    assert len(np.loadtxt(tmp_path / "md" / "Si.log", ndmin=2)) == 3
    captured = capsys.readouterr()
    assert "ms/step" in captured.out and "md NVT Si8: step 4/4 (100%)" in captured.err


def test_cli_md_bad_input(tmp_path, capsys):
    assert main(["md", str(tmp_path / "missing.cif"), "--steps", "2", "--device", "cpu"]) == 1
    assert "missing.cif" in capsys.readouterr().err


def test_python_api_never_overwrites_an_earlier_run(tmp_path, calc):
    """MolecularDynamics and StructOptimizer.relax refuse to replace existing trajectory and log
    files unless asked (overwrite=True, or append=True for MD), before doing any work."""
    s = si8(rattle=0.02)
    traj, log = tmp_path / "md.traj", tmp_path / "md.log"
    log.write_text("# an earlier run\n1 2 3\n")
    with pytest.raises(FileExistsError, match="md.log exists: pass overwrite=True"):
        MolecularDynamics(s, model=calc, trajectory=traj, logfile=log)
    assert log.read_text() == "# an earlier run\n1 2 3\n" and not traj.exists()
    with MolecularDynamics(s, model=calc, trajectory=traj, logfile=log, overwrite=True) as md:
        md.run(2)
    assert "an earlier run" not in log.read_text()
    rlog = tmp_path / "r.log"
    rlog.write_text("keep me\n")
    with pytest.raises(FileExistsError, match="r.log exists"):
        StructOptimizer(calc).relax(s, logfile=rlog, steps=2)
    assert rlog.read_text() == "keep me\n"
    StructOptimizer(calc).relax(s, logfile=rlog, steps=2, overwrite=True)
    assert "keep me" not in rlog.read_text()


def test_relax_result_accepts_a_3x3_stress_from_another_calculator():
    """chgnet's calculator reports a 3x3 stress; the relaxation's result must not fail on it."""
    from fastchgnet.md.relax import _full_stress

    voigt = np.array([1.0, 2.0, 3.0, 0.4, 0.5, 0.6])
    full = _full_stress(voigt)
    assert full.shape == (3, 3) and full[1, 2] == 0.4 and full[0, 1] == 0.6
    np.testing.assert_array_equal(_full_stress(full), full)
