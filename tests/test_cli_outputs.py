"""Command-line outputs: relax/md results named after each input and never silently replaced
(issue 16 case 3), magnetic moments in the relaxed structure files, real units in
``predict --json``, every data block of a CIF, progress lines, and scipy's ``logm`` warnings
hidden only around the relaxation. A small random model keeps these fast."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from ase.io import read
from conftest import small_config

import fastchgnet
from fastchgnet.cli import main
from fastchgnet.cli.common import output_names, read_structures
from fastchgnet.data.prototypes import make


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    torch.manual_seed(0)
    net = fastchgnet.CHGNet(small_config())
    with torch.no_grad():
        net.atom_ref.copy_(torch.linspace(-5.0, -1.0, net.atom_ref.numel()))
    return str(fastchgnet.save_checkpoint(net, tmp_path_factory.mktemp("ckpt") / "small.pt"))


def nacl(seed: int = 1):
    return make("rocksalt", ["Na", "Cl"], rattle=0.05, seed=seed)


def run(argv, ckpt) -> int:
    return main([*argv, "--model", ckpt, "--device", "cpu"])


# ----------------------------------------------------------------------------------------------
# names


def test_output_names():
    assert output_names(["Si.cif"]) == ["Si"]  # not "Si_cif"
    # VASP names in lower case: ASE reads any "*POSCAR*" file as VASP, whatever its extension
    assert output_names(["a/POSCAR"]) == ["poscar"]
    assert output_names(["mp1/POSCAR", "mp2/POSCAR"]) == ["mp1_poscar", "mp2_poscar"]
    assert output_names(["x/CONTCAR_relaxed.vasp"]) == ["contcar_relaxed"]
    assert output_names(["x/a.cif", "x/a.vasp", "b.cif"]) == ["a_cif", "a_vasp", "b"]
    assert output_names(["p/x/P", "q/x/P"]) == ["p_x_P", "q_x_P"]
    assert output_names(["run.extxyz@0", "run.extxyz@1"]) == ["run-0", "run-1"]
    assert output_names(["Si.cif", "Si.cif", "si.cif"]) == ["Si", "Si-2", "si-3"]  # no case clash
    names = output_names(["a/b/S.cif", "c/b/S.cif", "S.vasp", "S.cif"])
    assert len({n.casefold() for n in names}) == 4


def test_relax_same_stem_in_two_folders(tmp_path, ckpt, capsys):
    """Issue 16 case 3: ``relax mp1/POSCAR mp2/POSCAR`` keeps both results; a second run refuses
    to replace them (exit 1, before any work) unless --overwrite."""
    for i, folder in enumerate(("mp1", "mp2")):
        (tmp_path / folder).mkdir()
        nacl(seed=i).to(filename=str(tmp_path / folder / "POSCAR"), fmt="poscar")
    files = [str(tmp_path / "mp1" / "POSCAR"), str(tmp_path / "mp2" / "POSCAR")]
    out = tmp_path / "rel"
    run(["relax", *files, "--steps", "2", "--out", str(out)], ckpt)
    capsys.readouterr()
    names = {p.name for p in out.iterdir()}
    assert names == {f"{n}{x}" for n in ("mp1_poscar", "mp2_poscar")
                     for x in (".cif", ".extxyz", ".traj", ".log")}
    a, b = (read(out / f"{n}_poscar.extxyz") for n in ("mp1", "mp2"))
    assert not np.allclose(a.positions, b.positions)  # two different results
    stamps = {p: p.stat().st_mtime_ns for p in out.iterdir()}

    assert run(["relax", *files, "--steps", "2", "--out", str(out)], ckpt) == 1
    err = capsys.readouterr().err
    assert "exist already" in err and "--overwrite" in err and "mp1_poscar.cif" in err
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    run(["relax", *files, "--steps", "1", "--out", str(out), "--overwrite"], ckpt)
    assert all(p.stat().st_mtime_ns != stamps[p] for p in out.iterdir())
    assert len(read(out / "mp1_poscar.traj", ":")) == 2  # replaced, not appended


def test_relaxed_outputs_carry_magmoms(tmp_path, ckpt):
    from pymatgen.core import Structure

    cif = tmp_path / "NaCl.cif"
    nacl().to(filename=str(cif))
    run(["relax", str(cif), "--steps", "2", "--out", str(tmp_path / "rel"), "--quiet"], ckpt)
    final = read(tmp_path / "rel" / "NaCl.traj", -1)
    magmoms = final.get_magnetic_moments()
    assert magmoms.shape == (len(final),) and np.abs(magmoms).max() > 0
    frame = read(tmp_path / "rel" / "NaCl.extxyz")
    np.testing.assert_allclose(frame.get_magnetic_moments(), magmoms, atol=1e-6)
    np.testing.assert_allclose(frame.positions, final.positions, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no magnetic symmetry" notes of pymatgen's mCIF reader
        s = Structure.from_file(tmp_path / "rel" / "NaCl.cif")
    got = [float(np.linalg.norm(np.asarray(m.moment if hasattr(m, "moment") else m)))
           for m in s.site_properties["magmom"]]
    # the CIF lists sites in the file's order: compare as sets of (position, magmom)
    order = [int(np.argmin(np.linalg.norm(final.positions - x, axis=1))) for x in s.cart_coords]
    np.testing.assert_allclose(got, magmoms[order], atol=1e-6)


def test_md_outputs_named_and_not_overwritten(tmp_path, ckpt, capsys):
    cif = tmp_path / "NaCl.cif"
    nacl().to(filename=str(cif))
    out = tmp_path / "md"
    argv = ["md", str(cif), "--steps", "2", "--out", str(out)]
    assert run(argv, ckpt) == 0
    assert {p.name for p in out.iterdir()} == {"NaCl.traj", "NaCl.log"}
    assert len(read(out / "NaCl.traj", ":")) == 3  # default loginterval 1: steps 0, 1, 2
    assert "md NVT" in capsys.readouterr().err  # progress line
    before = (out / "NaCl.log").read_text()
    assert run(argv, ckpt) == 1
    assert "exist already" in capsys.readouterr().err
    assert (out / "NaCl.log").read_text() == before
    assert run([*argv, "--trajectory", str(out / "NaCl.traj"), "--logfile",
                str(tmp_path / "new.log")], ckpt) == 1  # an explicit path is checked too
    assert "NaCl.traj" in capsys.readouterr().err
    assert run([*argv, "--overwrite", "--quiet"], ckpt) == 0
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------
# predict


@pytest.mark.parametrize("intensive", [True, False])
def test_predict_json_units(tmp_path, intensive, capsys):
    torch.manual_seed(0)
    net = fastchgnet.CHGNet(small_config(is_intensive=intensive))
    ckpt = str(fastchgnet.save_checkpoint(net, tmp_path / "m.pt"))
    cif = tmp_path / "NaCl.cif"
    nacl().to(filename=str(cif))
    assert run(["predict", str(cif), "--json", str(tmp_path / "p.json")], ckpt) == 0
    data = json.loads((tmp_path / "p.json").read_text())
    units = data["units"]
    assert units["e"] == ("eV/atom" if intensive else "eV (per structure)")
    assert units["f"] == "eV/Angstrom" and units["s"].startswith("GPa")
    assert units["m"].startswith("mu_B")
    record = data["predictions"][0]
    for key in record:  # every numeric field has a unit, and no unit is just a key name
        if key not in ("file", "formula"):
            assert key in units, key
    assert set(record["summary"]) == set(units["summary"])
    for unit in [*(v for k, v in units.items() if k != "summary"), *units["summary"].values()]:
        assert unit not in ("e", "f", "s", "m") and any(c in unit for c in "eGmc"), unit


def test_cif_with_two_data_blocks(tmp_path, ckpt, capsys):
    """Issue 16 case 9 (CLI side): every data block is read (labelled path@i); a block that holds
    no structure is an error naming the file, not a silent drop."""
    a, b = tmp_path / "a.cif", tmp_path / "b.cif"
    nacl().to(filename=str(a))
    make("cscl", ["Cs", "Cl"]).to(filename=str(b))
    two = tmp_path / "two.cif"
    two.write_text(a.read_text() + "\n" + b.read_text().replace("data_", "data_second_", 1))
    items = read_structures(str(two))
    assert [label for label, _ in items] == [f"{two}@0", f"{two}@1"]
    assert [s.composition.reduced_formula for _, s in items] == ["NaCl", "CsCl"]
    assert run(["predict", str(two)], ckpt) == 0
    out = capsys.readouterr().out
    assert f"{two}@0" in out and f"{two}@1" in out
    bad = tmp_path / "bad.cif"
    bad.write_text(a.read_text() + "\ndata_broken\n_cell_length_a 3.0\n")
    with pytest.raises(ValueError, match=r"bad\.cif: 2 CIF data block\(s\) but 1 readable"):
        read_structures(str(bad))
    assert run(["predict", str(bad)], ckpt) == 1
    assert "bad.cif" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# warnings


def test_logm_warnings_hidden_only_around_the_relaxation(tmp_path, ckpt, monkeypatch):
    import fastchgnet.cli.md as cli_md

    original = cli_md.StructOptimizer.relax

    def noisy_relax(self, *args, **kwargs):
        warnings.warn("logm result may be inaccurate, approximate err = 1.2e-13", RuntimeWarning)
        warnings.warn("a warning that matters", RuntimeWarning)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cli_md.StructOptimizer, "relax", noisy_relax)
    cif = tmp_path / "NaCl.cif"
    nacl().to(filename=str(cif))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        run(["relax", str(cif), "--steps", "1", "--out", str(tmp_path / "r"), "--quiet"], ckpt)
        assert warnings.filters == before  # scoped: nothing left behind
        warnings.warn("logm result may be inaccurate, approximate err = 1e-13", RuntimeWarning)
    messages = [str(w.message) for w in caught]
    assert "a warning that matters" in messages
    assert messages.count("logm result may be inaccurate, approximate err = 1e-13") == 1
    assert not any("1.2e-13" in m for m in messages)


def test_relax_fmax_default_is_one_value():
    """One default per option across the CLI and Python: relax fmax 0.1 eV/Å (chgnet's)."""
    import inspect

    from fastchgnet.cli import build_parser
    from fastchgnet.md.relax import StructOptimizer

    args = build_parser().parse_args(["relax", "x.cif"])
    py = inspect.signature(StructOptimizer.relax).parameters
    assert args.fmax == py["fmax"].default == 0.1
    assert args.smax == py["smax"].default and args.steps == py["steps"].default
    md = build_parser().parse_args(["md", "x.cif", "--steps", "1"])
    from fastchgnet.md.dynamics import MolecularDynamics

    mdp = inspect.signature(MolecularDynamics.__init__).parameters
    for opt, name in (("timestep", "timestep"), ("temperature", "temperature"),
                      ("loginterval", "loginterval"), ("seed", "seed"), ("pressure", "pressure"),
                      ("ensemble", "ensemble"), ("thermostat", "thermostat")):
        assert getattr(md, opt) == mdp[name].default, opt
