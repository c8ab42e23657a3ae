"""The ASE calculator: parity with chgnet's CHGNetCalculator, units and signs, model variants,
caching, bad input."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk
from conftest import TOL32, max_abs, small_config
from pymatgen.io.ase import AseAtomsAdaptor

import fastchgnet
from fastchgnet.md.calculator import CHGNetCalculator, voigt_stress
from fastchgnet.model.weights import MODEL_TYPES

SHEAR = np.array([[0.02, 0.015, -0.01], [0.015, -0.03, 0.005], [-0.01, 0.005, 0.01]])


def strained_si(n_rep: int = 1, seed: int = 0) -> Atoms:
    """Conventional diamond Si (8 atoms x n_rep^3), sheared and rattled: every stress component
    and every force is non-zero."""
    a = bulk("Si", "diamond", a=5.43, cubic=True).repeat(n_rep)
    a.set_cell(a.cell[:] @ (np.eye(3) + SHEAR), scale_atoms=True)
    a.rattle(0.05, seed=seed)
    return a


@pytest.fixture(scope="module")
def calc():
    return CHGNetCalculator("0.3.0", device="cpu")


@pytest.fixture(scope="module")
def ref_calc(ref_model):
    from chgnet.model.dynamics import CHGNetCalculator as RefCalculator

    with contextlib.redirect_stdout(io.StringIO()):
        return RefCalculator(model=ref_model, use_device="cpu", return_site_energies=True)


def _parity_atoms(cif_structures) -> dict[str, Atoms]:
    out = {name: AseAtomsAdaptor.get_atoms(s) for name, s in cif_structures.items()}
    out["Si16-sheared"] = strained_si(1, seed=3).repeat((2, 1, 1))
    return out


def test_parity_with_chgnet_calculator(calc, ref_calc, cif_structures):
    """Energy, free energy, forces, stress (Voigt eV/Å³), magmoms and site energies equal those
    of chgnet's CHGNetCalculator to the float32 parity tolerances."""
    for name, atoms in _parity_atoms(cif_structures).items():
        ours, ref = atoms.copy(), atoms.copy()
        ours.calc, ref.calc = calc, ref_calc
        n = len(atoms)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e_ref = ref.get_potential_energy()
            f_ref, s_ref = ref.get_forces(), ref.get_stress()  # ASE converts chgnet's 3x3 to Voigt
            m_ref = ref.get_magnetic_moments()
            site_ref = ref.calc.results["energies"]
        assert abs(ours.get_potential_energy() - e_ref) / n < TOL32["e"], name
        assert ours.calc.results["free_energy"] == ours.get_potential_energy()
        assert max_abs(ours.get_forces(), f_ref) < TOL32["f"], name
        stress = ours.get_stress()
        assert stress.shape == (6,)
        assert max_abs(stress, s_ref) < TOL32["s"] * units.GPa, name
        assert max_abs(ours.get_magnetic_moments(), m_ref) < TOL32["m"], name
        assert max_abs(ours.calc.results["energies"], site_ref) < 5 * TOL32["e"], name
        assert abs(ours.calc.results["energies"].sum() - ours.get_potential_energy()) < 1e-3


def test_stress_sign_and_units(calc, model):
    """Compressed Si: negative (compressive) diagonal stress, equal to the model's GPa stress
    times ase.units.GPa in ASE's Voigt order (xx, yy, zz, yz, xz, xy)."""
    atoms = bulk("Si", "diamond", a=5.2, cubic=True)
    atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.5 * SHEAR), scale_atoms=True)
    atoms.calc = calc
    stress = atoms.get_stress()
    assert (stress[:3] < -5 * units.GPa).all()  # ~ -10 GPa and below
    s = model.predict(atoms, task="efs")["s"]
    expected = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]]) * units.GPa
    np.testing.assert_allclose(stress, expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(voigt_stress(s), expected)
    assert np.abs(stress[3:]).max() > 1e-3 * np.abs(stress[:3]).max()  # shear is exercised


def _small(model_type: str = "exact") -> torch.nn.Module:
    torch.manual_seed(0)
    net = MODEL_TYPES[model_type](small_config())
    with torch.no_grad():
        net.atom_ref.copy_(torch.linspace(-5.0, -1.0, net.atom_ref.numel()))
    return net.double().eval()


def test_forces_and_stress_are_energy_derivatives():
    """Finite differences of the calculator's energy (float64 model): F = -dE/dx and the ASE
    stress (1/V) dE/dε, with ε a symmetric strain of cell and positions."""
    calc = CHGNetCalculator(_small(), device="cpu")
    atoms = strained_si()
    atoms.calc = calc
    forces, stress = atoms.get_forces(), atoms.get_stress(voigt=False)
    h = 1e-4
    for i, k in [(0, 0), (3, 1), (5, 2)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[i, k] += h
        minus.positions[i, k] -= h
        plus.calc = minus.calc = calc
        fd = -(plus.get_potential_energy() - minus.get_potential_energy()) / (2 * h)
        assert abs(fd - forces[i, k]) < 1e-6 * max(1.0, abs(fd))
    vol = atoms.get_volume()
    for i, j in [(0, 0), (1, 2), (0, 1)]:
        eps = np.zeros((3, 3))
        eps[i, j] = eps[j, i] = h / (2 if i != j else 1)
        e = []
        for sgn in (1, -1):
            b = atoms.copy()
            b.set_cell(atoms.cell[:] @ (np.eye(3) + sgn * eps), scale_atoms=True)
            b.calc = calc
            e.append(b.get_potential_energy())
        fd = (e[0] - e[1]) / (2 * h) / vol
        assert abs(fd - stress[i, j]) < 1e-7, (i, j, fd, stress[i, j])


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPES))
def test_every_model_type(model_type, tmp_path):
    """Each registered model type (exact, decoupled, heads when present) works as a calculator,
    gives the model's own predictions, and loads from a checkpoint with the same results."""
    net = _small(model_type)
    atoms = strained_si()
    atoms.calc = CHGNetCalculator(net, device="cpu")
    pred = net.predict(atoms, task="efsm", return_site_energies=True)
    n = len(atoms)
    assert abs(atoms.get_potential_energy() - float(pred["e"]) * n) < 1e-9 * n
    np.testing.assert_allclose(atoms.get_forces(), pred["f"], atol=1e-10)
    np.testing.assert_allclose(atoms.get_stress(), voigt_stress(pred["s"]), atol=1e-12)
    np.testing.assert_allclose(atoms.get_magnetic_moments(), pred["m"], atol=1e-10)
    np.testing.assert_allclose(atoms.calc.results["energies"], pred["site_energies"], atol=1e-10)

    path = fastchgnet.save_checkpoint(net, tmp_path / f"{model_type}.pt")
    loaded = atoms.copy()
    loaded.calc = CHGNetCalculator(str(path), device="cpu")
    assert type(loaded.calc.model) is type(net)
    assert loaded.calc.dtype == torch.float64
    assert abs(loaded.get_potential_energy() - atoms.get_potential_energy()) < 1e-9 * n
    np.testing.assert_allclose(loaded.get_forces(), atoms.get_forces(), atol=1e-10)


def test_dtype_option():
    calc = CHGNetCalculator(_small().float(), device="cpu", dtype=torch.float64)
    assert calc.dtype == torch.float64
    atoms = strained_si()
    atoms.calc = calc
    assert atoms.get_forces().dtype == np.float64


def test_one_model_call_per_geometry():
    """All properties come from one forward pass; a moved atom triggers exactly one more."""
    calc = CHGNetCalculator(_small(), device="cpu")
    atoms = strained_si()
    atoms.calc = calc
    atoms.get_potential_energy()
    atoms.get_forces()
    atoms.get_stress()
    atoms.get_magnetic_moments()
    assert calc.n_calls == 1
    atoms.positions[0, 0] += 0.01
    atoms.get_forces()
    atoms.get_stress()
    assert calc.n_calls == 2


def test_task_ef_computes_stress_on_request():
    calc = CHGNetCalculator(_small(), device="cpu", task="ef")
    atoms = strained_si()
    atoms.calc = calc
    atoms.get_forces()
    assert "stress" not in calc.results and "magmoms" not in calc.results
    full = CHGNetCalculator(calc.model, device="cpu")
    np.testing.assert_allclose(atoms.get_stress(), full.get_stress(atoms), atol=1e-12)
    energy_only = CHGNetCalculator(calc.model, task="e")
    np.testing.assert_allclose(energy_only.get_forces(atoms), full.get_forces(atoms), atol=1e-12)


def test_structure_input_and_batch():
    """atoms_to_batch takes ASE Atoms and pymatgen Structures alike."""
    calc = CHGNetCalculator(_small(), device="cpu")
    atoms = strained_si()
    b1 = calc.atoms_to_batch(atoms)
    b2 = calc.atoms_to_batch(AseAtomsAdaptor.get_structure(atoms))
    assert b1.num_atoms == b2.num_atoms == 8 and b1.num_bonds == b2.num_bonds
    assert b1.positions.dtype == torch.float64 and b1.num_graphs == 1


def test_isolated_atoms():
    """An isolated atom raises a ValueError naming the structure, or is kept on request."""
    atoms = Atoms("Si2", positions=[[0, 0, 0], [10, 10, 10]], cell=np.eye(3) * 20, pbc=True)
    atoms.calc = CHGNetCalculator(_small(), device="cpu")
    with pytest.raises(ValueError, match=r"Si2.*isolated"):
        atoms.get_potential_energy()
    atoms.calc = CHGNetCalculator(_small(), device="cpu", on_isolated_atoms="ignore")
    assert np.isfinite(atoms.get_potential_energy())
    np.testing.assert_allclose(atoms.get_forces(), 0.0)
    with pytest.warns(UserWarning, match="isolated"):
        atoms.calc = CHGNetCalculator(_small(), device="cpu", on_isolated_atoms="warn")
        atoms.get_potential_energy()


def test_atoms_too_close():
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.positions[1] = atoms.positions[0] + [0.2, 0.1, 0.0]
    atoms.calc = CHGNetCalculator(_small(), device="cpu")
    with pytest.raises(ValueError, match=r"Si8.*apart"):
        atoms.get_forces()


def test_bad_options():
    with pytest.raises(ValueError, match="on_isolated_atoms"):
        CHGNetCalculator(_small(), on_isolated_atoms="skip")
    with pytest.raises(ValueError, match="graph"):
        CHGNetCalculator(_small(), graph="gpu")
    with pytest.raises(TypeError, match="model"):
        CHGNetCalculator(42)
    with pytest.raises(FileNotFoundError):
        CHGNetCalculator("/no/such/checkpoint.pt")


def test_unknown_keywords_are_errors():
    """No silent ``calc.parameters`` bucket: the issue's ``CHGNetCalculator(use_device="cpu",
    stress_weight=1.0, bogus=3)`` raises, naming fastchgnet's equivalents; ASE's own arguments
    still work."""
    with pytest.raises(TypeError) as err:
        CHGNetCalculator(_small(), use_device="cpu", stress_weight=1.0, bogus=3)
    msg = str(err.value)
    assert "use_device: fastchgnet calls this device=" in msg
    assert "stress_weight: fastchgnet's calculator always gives the stress in eV/Å^3" in msg
    assert "bogus: unknown" in msg and "fastchgnet.compat.chgnet" in msg
    with pytest.raises(TypeError, match="return_site_energies: fastchgnet always puts"):
        CHGNetCalculator(_small(), return_site_energies=True)
    calc = CHGNetCalculator(_small(), device="cpu", label="si", directory=".")
    assert calc.label == "si" and dict(calc.parameters) == {}


def test_lazy_exports():
    assert fastchgnet.CHGNetCalculator is CHGNetCalculator
    from fastchgnet.md import dynamics, relax

    assert fastchgnet.MolecularDynamics is dynamics.MolecularDynamics
    assert fastchgnet.StructOptimizer is relax.StructOptimizer
    assert fastchgnet.relax_structure is relax.relax_structure
    with pytest.raises(AttributeError):
        fastchgnet.NoSuchThing  # noqa: B018


def test_device_graph_mode_matches_host():
    """graph="device" (torch neighbour list with a Verlet skin) gives the host graph's results
    along an MD run while reusing its neighbour list; its errors name the structure too."""
    from fastchgnet.md.dynamics import MolecularDynamics

    net = _small()
    host = CHGNetCalculator(net, graph="host")
    dev = CHGNetCalculator(net, graph="device", skin=1.0)
    assert (host.graph_mode, dev.graph_mode) == ("host", "device")
    runs = []
    for calc in (host, dev):
        md = MolecularDynamics(strained_si(), model=calc, ensemble="nve", starting_temperature=300,
                               seed=0)
        md.run(10)
        runs.append(md.atoms)
    np.testing.assert_allclose(runs[1].positions, runs[0].positions, atol=1e-10)
    np.testing.assert_allclose(runs[1].get_stress(), runs[0].get_stress(), atol=1e-12)
    verlet = dev._device_graph.verlet
    assert verlet.n_calls == 11 and verlet.n_builds < verlet.n_calls

    atoms = Atoms("Si2", positions=[[0, 0, 0], [10, 10, 10]], cell=np.eye(3) * 20, pbc=True)
    atoms.calc = CHGNetCalculator(net, graph="device")
    with pytest.raises(ValueError, match=r"Si2.*isolated"):
        atoms.get_potential_energy()


def test_forward_hook_compiled():
    """``forward=`` replaces the model call (here fastchgnet.compile.CompiledForward with the
    eager backend): same energy, forces, stress and magmoms; no per-site energies then."""
    compiled = pytest.importorskip("fastchgnet.compile")
    net = _small()
    atoms = strained_si()
    atoms.calc = CHGNetCalculator(net)
    ref = {"e": atoms.get_potential_energy(), "f": atoms.get_forces(), "s": atoms.get_stress(),
           "m": atoms.get_magnetic_moments()}
    fast = atoms.copy()
    fast.calc = CHGNetCalculator(net, forward=compiled.CompiledForward(net, backend="eager"))
    assert abs(fast.get_potential_energy() - ref["e"]) < 1e-9
    np.testing.assert_allclose(fast.get_forces(), ref["f"], atol=1e-10)
    np.testing.assert_allclose(fast.get_stress(), ref["s"], atol=1e-12)
    np.testing.assert_allclose(fast.get_magnetic_moments(), ref["m"], atol=1e-10)
    assert "energies" not in fast.calc.results
