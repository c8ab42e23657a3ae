"""fastchgnet.compat.chgnet against chgnet 0.4.2: the same module paths, names, signatures and
defaults; predictions, relaxations, MD in every ensemble and the EOS give chgnet's numbers and
write chgnet's files; unknown keywords raise. Our own API takes chgnet objects and names chgnet's
keywords' equivalents."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import pickle
import warnings

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.io import read
from conftest import TOL32, max_abs
from pymatgen.io.ase import AseAtomsAdaptor

from fastchgnet.data.prototypes import make

pytest.importorskip("chgnet")


def quiet(fn, *args, **kwargs):
    """Call a chgnet function without its prints and warnings."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def ours():
    from fastchgnet.compat.chgnet.model import CHGNet

    return CHGNet.load(use_device="cpu", verbose=False)


@pytest.fixture(scope="module")
def structures(cif_structures):
    """The shared CIFs and two built-in prototypes (rattled: forces and stress non-zero)."""
    out = dict(cif_structures)
    out["NaCl"] = make("rocksalt", ["Na", "Cl"], rattle=0.03, seed=1)
    out["Fe-bcc"] = make("bcc", ["Fe"], supercell=(2, 1, 1), strain=0.01, rattle=0.03, seed=2)
    return out


def si8(rattle: float = 0.03, seed: int = 0):
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(rattle, seed=seed)
    return atoms


# ----------------------------------------------------------------------------------------------
# names, module paths, signatures and defaults

# (chgnet module, our module, names that must exist in both)
MODULES = [
    ("chgnet.model", "fastchgnet.compat.chgnet.model",
     ["CHGNet", "StructOptimizer", "CHGNetCalculator", "MolecularDynamics"]),
    ("chgnet.model.model", "fastchgnet.compat.chgnet.model.model", ["CHGNet"]),
    ("chgnet.model.dynamics", "fastchgnet.compat.chgnet.model.dynamics",
     ["CHGNetCalculator", "StructOptimizer", "TrajectoryObserver", "CrystalFeasObserver",
      "MolecularDynamics", "EquationOfState", "OPTIMIZERS"]),
    ("chgnet.utils", "fastchgnet.compat.chgnet.utils",
     ["solve_charge_by_mag", "determine_device", "cuda_devices_sorted_by_free_mem", "mae",
      "read_json", "write_json", "mkdir", "AverageMeter"]),
    ("chgnet.utils.vasp_utils", "fastchgnet.compat.chgnet.utils.vasp_utils",
     ["solve_charge_by_mag"]),
    ("chgnet.utils.common_utils", "fastchgnet.compat.chgnet.utils.common_utils",
     ["determine_device"]),
    ("chgnet.graph", "fastchgnet.compat.chgnet.graph", ["CrystalGraphConverter", "CrystalGraph"]),
]


@pytest.mark.parametrize("ref_mod,our_mod,names", MODULES, ids=[m[1] for m in MODULES])
def test_module_paths_and_names(ref_mod, our_mod, names):
    ref, mine = importlib.import_module(ref_mod), importlib.import_module(our_mod)
    for name in names:
        assert hasattr(ref, name), f"{ref_mod}.{name} is not chgnet's"
        assert hasattr(mine, name), f"{our_mod}.{name} missing"


# (qualified name, parameters whose default is deliberately ours): every other parameter of
# chgnet's signature exists with chgnet's default
SIGNATURES = [
    ("model.model:CHGNet.load", ()),
    ("model.model:CHGNet.predict_structure", ()),
    ("model.model:CHGNet.predict_graph", ()),
    ("model.model:CHGNet.from_dict", ()),
    ("model.dynamics:CHGNetCalculator.__init__", ()),
    ("model.dynamics:CHGNetCalculator.from_file", ()),
    ("model.dynamics:CHGNetCalculator.calculate", ()),
    ("model.dynamics:StructOptimizer.__init__", ()),
    ("model.dynamics:StructOptimizer.relax", ()),
    ("model.dynamics:TrajectoryObserver.save", ()),
    ("model.dynamics:MolecularDynamics.__init__", ()),
    ("model.dynamics:MolecularDynamics.run", ()),
    ("model.dynamics:MolecularDynamics.set_atoms", ()),
    ("model.dynamics:MolecularDynamics.upper_triangular_cell", ()),
    ("model.dynamics:EquationOfState.__init__", ()),
    ("model.dynamics:EquationOfState.fit", ()),
    ("model.dynamics:EquationOfState.get_bulk_modulus", ()),
    ("model.dynamics:EquationOfState.get_compressibility", ()),
    ("utils.vasp_utils:solve_charge_by_mag", ()),
    ("utils.common_utils:determine_device", ()),
]


def _resolve(prefix: str, spec: str):
    mod, _, attr = spec.partition(":")
    obj = importlib.import_module(f"{prefix}.{mod}")
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("spec,ours_only", SIGNATURES, ids=[s[0] for s in SIGNATURES])
def test_signatures_and_defaults_are_chgnets(spec, ours_only):
    ref = inspect.signature(_resolve("chgnet", spec)).parameters
    mine = inspect.signature(_resolve("fastchgnet.compat.chgnet", spec)).parameters
    for name, p in ref.items():
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or name in ours_only:
            continue
        assert name in mine, f"{spec}: chgnet's argument {name!r} missing"
        assert mine[name].default == p.default, (spec, name, mine[name].default, p.default)


def test_unknown_keywords_raise(ours):
    from fastchgnet.compat.chgnet.model import (CHGNet, CHGNetCalculator, MolecularDynamics,
                                                StructOptimizer)

    with pytest.raises(TypeError, match="bogus"):
        CHGNetCalculator(model=ours, use_device="cpu", stress_weight=1.0, bogus=3)
    with pytest.raises(TypeError, match="bogus"):
        CHGNet(bogus=1)
    with pytest.raises(TypeError):
        CHGNet.load(model_name="0.3.0", bogus=1)
    with pytest.raises(TypeError):
        MolecularDynamics(si8(), model=ours, bogus=1)
    opt = StructOptimizer(model=ours, use_device="cpu")
    n = opt.calculator.n_calls
    with pytest.raises(TypeError, match="bogus"):
        opt.relax(si8(), bogus=1, verbose=False)
    assert opt.calculator.n_calls == n  # checked before anything runs
    calc = CHGNetCalculator(model=ours, use_device="cpu", label="x", directory=".")
    assert "bogus" not in calc.parameters and "use_device" not in calc.parameters
    with pytest.raises(ValueError, match="Optimizer"):
        StructOptimizer(model=ours, optimizer_class="Newton")
    with pytest.raises(ValueError, match="ase_filter"):
        opt.relax(si8(), ase_filter="NoSuchFilter", verbose=False)
    with pytest.raises(ValueError, match="model_name"):
        CHGNet.load(model_name="9.9.9")


# ----------------------------------------------------------------------------------------------
# CHGNet


def test_load_attributes(ours, ref_model):
    from fastchgnet.compat.chgnet.model.model import CHGNet
    from fastchgnet.model.exact import CHGNet as Exact

    assert isinstance(ours, Exact) and ours.version == ref_model.version == "0.3.0"
    assert ours.n_params == ref_model.n_params == 412_525
    assert ours.is_intensive is True and next(ours.parameters()).device.type == "cpu"
    assert "will run on cpu" in quiet_out(CHGNet.load, use_device="cpu")
    assert quiet_out(CHGNet.load, use_device="cpu", verbose=False) == ""


def quiet_out(fn, *args, **kwargs) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(*args, **kwargs)
    return buf.getvalue()


def test_predict_structure_matches_chgnet(ours, ref_model, structures):
    names = list(structures)
    items = [structures[k] for k in names]
    kw = dict(return_site_energies=True, return_atom_feas=True, return_crystal_feas=True)
    mine = ours.predict_structure(items, **kw)
    ref = quiet(ref_model.predict_structure, items, **kw)
    for name, o, r in zip(names, mine, ref):
        assert set(o) == set(r), name
        for key, tol in TOL32.items():
            assert max_abs(o[key], r[key]) < tol, (name, key)
        assert max_abs(o["site_energies"], r["site_energies"]) < 1e-4, name
        for key in ("crystal_fea", "atom_fea"):
            assert max_abs(o[key], r[key]) < 1e-4 * max(1.0, np.abs(r[key]).max()), (name, key)
    # chgnet's return types: one structure, or a list of one, gives a dict
    one = structures["NaCl"]
    for arg in (one, [one]):
        assert type(ours.predict_structure(arg)) is type(quiet(ref_model.predict_structure, arg))
    e_only = ours.predict_structure(one, task="e")
    assert set(e_only) == set(quiet(ref_model.predict_structure, one, task="e")) == {"e"}


def test_predict_graph(ours, ref_model, structures):
    s = structures["NaCl"]
    direct = ours.predict_structure(s)
    from_ours = ours.predict_graph(ours.graph_converter(s))
    from_chgnet_graph = ours.predict_graph(quiet(ref_model.graph_converter, s))
    for key in "efsm":
        assert max_abs(from_ours[key], direct[key]) == 0.0
        assert max_abs(from_chgnet_graph[key], direct[key]) < TOL32[key]
    assert len(ours.predict_graph([ours.graph_converter(s)] * 2, batch_size=1)) == 2
    with pytest.raises(ValueError, match="task"):
        ours.predict_graph(ours.graph_converter(s), task="xyz")
    with pytest.raises(TypeError):
        ours.predict_graph(42)


def test_from_dict_and_chgnet_object(ours, ref_model, structures):
    from fastchgnet.compat.chgnet.model import CHGNet

    s = structures["NaCl"]
    want = ours.predict_structure(s)
    for model in (CHGNet.from_dict(ref_model.as_dict()), CHGNet.adopt(ref_model)):
        got = model.predict_structure(s)
        for key in "efsm":
            assert max_abs(got[key], want[key]) < 1e-6


# ----------------------------------------------------------------------------------------------
# calculator


def test_calculator_matches_chgnet(ref_model, structures):
    """chgnet's own CHGNet object goes into our calculator; results equal chgnet's calculator's."""
    from chgnet.model.dynamics import CHGNetCalculator as RefCalc

    from fastchgnet.compat.chgnet.model import CHGNetCalculator

    mine = CHGNetCalculator(model=ref_model, use_device="cpu", return_site_energies=True)
    ref = quiet(RefCalc, model=ref_model, use_device="cpu", return_site_energies=True)
    gpa = CHGNetCalculator(model=ref_model, use_device="cpu", stress_weight=1.0)
    for name in ("LiMnO2", "Fe-bcc"):
        atoms = AseAtomsAdaptor.get_atoms(structures[name])
        a, b, c = atoms.copy(), atoms.copy(), atoms.copy()
        a.calc, b.calc, c.calc = mine, ref, gpa
        n = len(atoms)
        assert abs(a.get_potential_energy() - quiet(b.get_potential_energy)) / n < TOL32["e"]
        assert max_abs(a.get_forces(), b.get_forces()) < TOL32["f"]
        assert max_abs(a.get_stress(), quiet(b.get_stress)) < TOL32["s"] * units.GPa
        assert max_abs(a.get_magnetic_moments(), b.get_magnetic_moments()) < TOL32["m"]
        assert max_abs(a.calc.results["energies"], b.calc.results["energies"]) < 1e-4
        assert max_abs(a.calc.results["crystal_fea"], b.calc.results["crystal_fea"]) < 1e-4
        np.testing.assert_allclose(c.get_stress(), a.get_stress() / units.GPa, atol=1e-6)
        assert "energies" not in c.calc.results  # only with return_site_energies, as chgnet
    assert mine.on_isolated_atoms == "warn"  # chgnet's default
    assert mine.version == "0.3.0" and mine.n_params == 412_525


def test_calculator_defaults_and_from_file():
    from fastchgnet.compat.chgnet.model import CHGNetCalculator
    from fastchgnet.model.weights import chgnet_weight_file

    calc = CHGNetCalculator.from_file(str(chgnet_weight_file("0.3.0")), use_device="cpu")
    assert calc.model.n_params == 412_525 and str(calc.device) == "cpu"
    assert calc.stress_weight == units.GPa and calc.return_site_energies is False


# ----------------------------------------------------------------------------------------------
# relaxation


def test_relax_matches_chgnet(ours, ref_model, structures, tmp_path, capsys):
    """A few FIRE steps with the Frechet cell filter: the same trajectory record, final
    structure (with magmoms) and pickles as chgnet's."""
    from chgnet.model import StructOptimizer as RefOpt

    from fastchgnet.compat.chgnet.model import StructOptimizer

    start = structures["LiMnO2"].copy()
    shifts = np.random.default_rng(0).normal(0.0, 0.06, (len(start), 3))
    for i, d in enumerate(shifts):  # both relaxations start from this copy
        start.translate_sites([i], d, frac_coords=False)
    kw = dict(steps=4, loginterval=1, verbose=False)
    mine = StructOptimizer(model=ours).relax(
        start.copy(), save_path=str(tmp_path / "o.pkl"),
        crystal_feas_save_path=str(tmp_path / "of.pkl"), **kw)
    ref_opt = quiet(RefOpt, model=ref_model, use_device="cpu")
    ref = quiet(ref_opt.relax, start.copy(), save_path=str(tmp_path / "r.pkl"),
                crystal_feas_save_path=str(tmp_path / "rf.pkl"), **kw)
    assert set(mine) == set(ref) == {"final_structure", "trajectory"}
    to, tr = mine["trajectory"], ref["trajectory"]
    assert len(to) == len(tr) == 6  # steps 0..4 and the final call, as chgnet (not converged)
    for attr in ("energies", "forces", "stresses", "magmoms", "atom_positions", "cells"):
        assert len(getattr(to, attr)) == len(getattr(tr, attr)), attr
        assert max_abs(np.array(getattr(to, attr)), np.array(getattr(tr, attr))) < 2e-3, attr
    fo, fr = mine["final_structure"], ref["final_structure"]
    assert list(fo.site_properties) == list(fr.site_properties) == ["magmom"]
    assert max_abs(fo.site_properties["magmom"], fr.site_properties["magmom"]) < 1e-3
    assert max_abs(fo.lattice.matrix, fr.lattice.matrix) < 1e-4
    assert max_abs(fo.cart_coords, fr.cart_coords) < 1e-4
    po, pr = (pickle.loads((tmp_path / f).read_bytes()) for f in ("o.pkl", "r.pkl"))
    assert set(po) == set(pr)
    for key in pr:
        assert np.shape(po[key]) == np.shape(pr[key]), key
    fo_, fr_ = (pickle.loads((tmp_path / f).read_bytes()) for f in ("of.pkl", "rf.pkl"))
    assert set(fo_) == set(fr_) == {"crystal_feas"}
    assert np.shape(fo_["crystal_feas"]) == np.shape(fr_["crystal_feas"])
    capsys.readouterr()
    StructOptimizer(model=ours).relax(start.copy(), steps=1)  # verbose=True: ASE's log
    assert "FIRE:" in capsys.readouterr().out


def test_relax_atoms_in_place_and_options(ours):
    from fastchgnet.compat.chgnet.model import StructOptimizer

    atoms = si8()
    res = StructOptimizer(model=ours, optimizer_class="BFGS").relax(
        atoms, relax_cell=False, steps=3, verbose=False, maxstep=0.05, assign_magmoms=False)
    assert "magmom" not in res["final_structure"].site_properties
    np.testing.assert_allclose(res["final_structure"].cart_coords, atoms.positions, atol=1e-8)
    assert res["trajectory"].atoms is atoms


# ----------------------------------------------------------------------------------------------
# molecular dynamics

CHGNET_ENSEMBLES = [("nve", "Berendsen_inhomogeneous"), ("nvt", "Berendsen_inhomogeneous"),
                    ("nvt", "Nose-Hoover"), ("npt", "Nose-Hoover"),
                    ("npt", "Berendsen_inhomogeneous"), ("npt", "NPT_Berendsen")]


@pytest.mark.parametrize("ensemble,thermostat", CHGNET_ENSEMBLES)
def test_md_matches_chgnet(ours, ref_model, tmp_path, ensemble, thermostat):
    """Three steps from the same velocities: chgnet's positions, cell and log rows, and the same
    trajectory frames, log header and crystal-feature pickle."""
    from chgnet.model.dynamics import MolecularDynamics as RefMD

    from fastchgnet.compat.chgnet.model import MolecularDynamics

    start = si8()
    rng = np.random.default_rng(3)
    start.set_momenta(rng.normal(0.0, 0.2, (len(start), 3)))
    runs = {}
    for tag, cls, model in (("ours", MolecularDynamics, ours), ("ref", RefMD, ref_model)):
        atoms = start.copy()
        kw = dict(model=model, ensemble=ensemble, thermostat=thermostat, temperature=600,
                  timestep=2.0, taut=20.0, taup=200.0, bulk_modulus=90.0, use_device="cpu",
                  trajectory=str(tmp_path / f"{tag}.traj"), logfile=str(tmp_path / f"{tag}.log"),
                  loginterval=1, crystal_feas_logfile=str(tmp_path / f"{tag}.pkl"))
        md = quiet(cls, atoms, **kw)
        quiet(md.run, 3)
        runs[tag] = md
    o, r = runs["ours"].atoms, runs["ref"].atoms
    assert max_abs(o.positions, r.positions) < 1e-4
    assert max_abs(o.cell[:], r.cell[:]) < 1e-4
    assert type(runs["ours"].dyn).__name__.replace("Melchionna", "") == \
        type(runs["ref"].dyn).__name__.replace("Melchionna", "")
    lo, lr = ((tmp_path / f"{t}.log").read_text().splitlines() for t in ("ours", "ref"))
    assert lo[0] == lr[0] and len(lo) == len(lr) == 5
    np.testing.assert_allclose(np.loadtxt(lo[1:]), np.loadtxt(lr[1:]), atol=2e-3)
    assert len(read(tmp_path / "ours.traj", ":")) == len(read(tmp_path / "ref.traj", ":")) == 4
    po, pr = (pickle.loads((tmp_path / f"{t}.pkl").read_bytes()) for t in ("ours", "ref"))
    assert np.shape(po["crystal_feas"]) == np.shape(pr["crystal_feas"]) == (4, 64)
    for attr in ("loginterval", "timestep", "bulk_modulus", "ensemble", "thermostat"):
        assert getattr(runs["ours"], attr, None) == getattr(runs["ref"], attr, None), attr
    for attr, suffix in (("trajectory", "traj"), ("logfile", "log"), ("crystal_feas_logfile", "pkl")):
        assert getattr(runs["ours"], attr) == str(tmp_path / f"ours.{suffix}")


def test_md_defaults_are_chgnets(ours):
    from ase.md.nptberendsen import NVTBerendsen

    from fastchgnet.compat.chgnet.model import MolecularDynamics

    md = MolecularDynamics(si8(), model=ours)
    assert isinstance(md.dyn, NVTBerendsen)
    assert md.dyn.dt == pytest.approx(2.0 * units.fs) and md.timestep == 2.0
    assert md.dyn.taut == pytest.approx(200.0 * units.fs)
    assert md.atoms.calc.on_isolated_atoms == "warn"
    with pytest.raises(ValueError, match="Thermostat"):
        MolecularDynamics(si8(), model=ours, thermostat="langevin")


def test_md_upper_triangular_cell(ours):
    from fastchgnet.compat.chgnet.model import MolecularDynamics

    atoms = bulk("Si", "diamond", a=5.43)  # fcc primitive cell: not upper triangular
    before = atoms.cell.cellpar()
    md = MolecularDynamics(atoms, model=ours, thermostat="Nose-Hoover")
    cell = md.atoms.cell[:]
    assert abs(cell[1, 0]) < 1e-12 and abs(cell[2, 0]) < 1e-12 and abs(cell[2, 1]) < 1e-12
    np.testing.assert_allclose(md.atoms.cell.cellpar(), before, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# equation of state and utils


def test_equation_of_state_matches_chgnet(ours, ref_model):
    from chgnet.model.dynamics import EquationOfState as RefEOS

    from fastchgnet.compat.chgnet.model import EquationOfState

    structure = AseAtomsAdaptor.get_structure(bulk("Si", "diamond", a=5.43))
    mine = EquationOfState(model=ours)
    mine.fit(structure, n_points=5, steps=60)
    ref = quiet(RefEOS, model=ref_model, use_device="cpu")
    quiet(ref.fit, structure, n_points=5, steps=60)
    assert mine.get_bulk_modulus(unit="GPa") == pytest.approx(ref.get_bulk_modulus(unit="GPa"),
                                                              rel=2e-3)
    assert mine.get_compressibility() == pytest.approx(ref.get_compressibility(), rel=2e-3)
    assert 70 < mine.get_bulk_modulus(unit="GPa") < 120
    with pytest.raises(ValueError, match="fitted"):
        EquationOfState(model=ours).get_bulk_modulus()


def test_solve_charge_by_mag_matches_chgnet(structures, capsys):
    from chgnet.utils import solve_charge_by_mag as ref_solve

    from fastchgnet.compat.chgnet.utils import solve_charge_by_mag

    s = structures["LiMnO2"].copy()
    s.remove_oxidation_states()
    s.add_site_property("magmom", [0.0, 0.0, 3.9, 3.1, 0.0, 0.0, 0.0, 0.0])
    mine, ref = solve_charge_by_mag(s), quiet(ref_solve, s)
    assert [site.specie.oxi_state for site in mine] == [site.specie.oxi_state for site in ref]
    assert "total_charge=" in capsys.readouterr().out
    s.replace(0, "Na")  # no rule for Na
    with pytest.warns(UserWarning, match="Failed"):
        assert solve_charge_by_mag(s) is None


# ----------------------------------------------------------------------------------------------
# our own API takes chgnet objects and explains chgnet's keywords


def test_our_api_takes_a_chgnet_model(ref_model, model):
    from fastchgnet.md import CHGNetCalculator, MolecularDynamics, StructOptimizer

    atoms = si8()
    a, b = atoms.copy(), atoms.copy()
    a.calc = CHGNetCalculator(ref_model, device="cpu")
    b.calc = CHGNetCalculator(model, device="cpu")
    assert abs(a.get_potential_energy() - b.get_potential_energy()) < 1e-6
    assert max_abs(a.get_forces(), b.get_forces()) < 1e-6
    res = StructOptimizer(ref_model, device="cpu").relax(si8(), steps=2, relax_cell=False)
    assert res.steps == 2
    md = MolecularDynamics(si8(), model=ref_model, device="cpu", ensemble="nve")
    md.run(1)


def test_predict_takes_a_chgnet_model(ref_model, model, monkeypatch):
    """fastchgnet.predict converts a chgnet CHGNet (the adapter fastchgnet.model registers);
    without an adapter a foreign object is a TypeError naming its type."""
    import fastchgnet

    # the module (fastchgnet.model's attribute "predict" is the function)
    predict_mod = importlib.import_module("fastchgnet.model.predict")

    s = make("rocksalt", ["Na", "Cl"], rattle=0.03, seed=1)
    got, want = fastchgnet.predict(ref_model, s), model.predict(s)
    monkeypatch.setattr(predict_mod, "_MODEL_ADAPTERS", [])
    with pytest.raises(TypeError, match="got chgnet.model.model.CHGNet"):
        fastchgnet.predict(ref_model, s)
    for key in "efsm":
        assert max_abs(got[key], want[key]) < 1e-6


def test_our_api_names_the_equivalent_of_chgnet_keywords():
    from fastchgnet.md import CHGNetCalculator, MolecularDynamics, StructOptimizer

    with pytest.raises(TypeError, match="use_device: fastchgnet calls this device="):
        CHGNetCalculator("0.3.0", use_device="cpu")
    with pytest.raises(TypeError, match="bogus"):
        CHGNetCalculator("0.3.0", device="cpu", bogus=3)
    with pytest.raises(TypeError, match="optimizer_class: fastchgnet calls this optimizer="):
        StructOptimizer("0.3.0", optimizer_class="FIRE")
    opt = StructOptimizer("0.3.0", device="cpu")
    for kw, hint in (("save_path", "trajectory="), ("ase_filter", "cell_filter="),
                     ("crystal_feas_save_path", "compat"), ("bogus", "unknown")):
        with pytest.raises(TypeError, match=hint):
            opt.relax(si8(), **{kw: "x"})
    assert opt.calculator.n_calls == 0
    with pytest.raises(TypeError, match="append_trajectory: fastchgnet calls this append="):
        MolecularDynamics(si8(), model=opt.calculator, append_trajectory=True)
    with pytest.raises(TypeError, match="crystal_feas_logfile"):
        MolecularDynamics(si8(), model=opt.calculator, crystal_feas_logfile="x.pkl")


def test_migration_page_imports_work():
    """Every ``from fastchgnet.compat...`` line of docs/from_chgnet.md imports, and each
    commented chgnet import above it names the same things."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "from_chgnet.md").read_text()
    lines = text.splitlines()
    ours = [(i, x) for i, x in enumerate(lines) if x.startswith("from fastchgnet.compat")]
    assert len(ours) >= 2
    for i, line in ours:
        exec(line, {})  # noqa: S102
        ref = lines[i - 1].lstrip("# ")
        assert ref.startswith("from chgnet") and \
            ref.replace("chgnet", "fastchgnet.compat.chgnet", 1) == line
        exec(ref, {})  # noqa: S102  (the chgnet line imports too)
