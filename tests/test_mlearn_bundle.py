"""The bundled mlearn DFT sets (fastchgnet/assets/mlearn), the ``mlearn:Ge`` dataset specs, and the
default ``fastchgnet demo`` (fine-tuning 0.3.0 on them) at a tiny budget."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from fastchgnet.data.readers import detect_format, read_dataset, read_mlearn, resolve_dataset_spec
from fastchgnet.data.readers.bundled import is_dataset_spec, mlearn_dir, mlearn_path, mlearn_sets

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = ROOT.parent / "shared" / "data" / "mlearn"
MANIFEST = json.loads((mlearn_dir() / "manifest.json").read_text())
FILES = sorted(MANIFEST["files"])


def _original(name: str) -> Path:
    entry = MANIFEST["files"][name]
    return ORIGINAL / entry["element"] / f"{entry['split']}.json"


# ------------------------------------------------------------------------------------------------
# the bundle


def test_bundle_holds_the_sets_the_licence_and_the_provenance():
    assert mlearn_sets() == {"Cu": ("test",), "Ge": ("train", "test"), "Li": ("train", "test"),
                             "Mo": ("train", "test"), "Ni": ("test",), "Si": ("train", "test")}
    licence = (mlearn_dir() / "LICENSE").read_text()
    assert licence.startswith("BSD 3-Clause License") and "Materials Virtual Lab" in licence
    if (ORIGINAL / "LICENSE").is_file():
        assert licence == (ORIGINAL / "LICENSE").read_text()  # verbatim
    readme = (mlearn_dir() / "README.md").read_text()
    assert "github.com/materialsvirtuallab/mlearn" in readme
    assert "J. Phys. Chem. A" in readme and "10.1021/acs.jpca.9b08723" in readme
    on_disk = sorted(p.name for p in mlearn_dir().glob("*.json.gz"))
    assert on_disk == FILES
    total = sum(p.stat().st_size for p in mlearn_dir().iterdir())
    assert total < 2_000_000, f"the bundle grew to {total:,} bytes"


def test_bundle_is_package_data():
    """pyproject ships the folder in the wheel (a package-data glob does not recurse)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "assets/mlearn/*" in data["fastchgnet"]
    assert mlearn_dir() == ROOT / "fastchgnet" / "assets" / "mlearn"
    assert not any(p.is_dir() for p in mlearn_dir().iterdir())  # nothing a flat glob would miss


@pytest.mark.parametrize("name", FILES)
def test_every_bundled_set_loads(name):
    entry = MANIFEST["files"][name]
    samples = list(read_mlearn(mlearn_dir() / name))
    assert len(samples) == entry["frames"]
    assert sum(s.n_atoms for s in samples) == entry["atoms"]
    assert all(s.forces is not None and s.stress is not None and s.magmom is None for s in samples)
    assert {str(el) for s in samples for el in s.structure.composition} == {entry["element"]}
    assert {s.info["group"] for s in samples} == set(entry["groups"])
    original = _original(name)
    if not original.is_file():
        return  # a fresh clone without ../shared: the bundle alone is checked
    raw = original.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == entry["original_sha256"]
    assert len(json.loads(raw)) == len(samples)


def test_bundle_is_lossless_for_what_the_reader_reads():
    name = "Ge-test.json.gz"
    original = _original(name)
    if not original.is_file():
        pytest.skip(f"original mlearn data not found at {ORIGINAL}")
    for a, b in zip(read_mlearn(original), read_mlearn(mlearn_dir() / name), strict=True):
        assert [str(x) for x in a.structure.species] == [str(x) for x in b.structure.species]
        assert np.array_equal(a.structure.lattice.matrix, b.structure.lattice.matrix)
        assert np.array_equal(a.structure.frac_coords, b.structure.frac_coords)
        assert a.energy_per_atom == b.energy_per_atom and a.info == b.info
        assert np.array_equal(a.forces, b.forces) and np.array_equal(a.stress, b.stress)


def test_bundled_files_are_plain_gzipped_mlearn_json():
    with gzip.open(mlearn_dir() / "Ge-test.json.gz", "rt") as fh:
        frames = json.load(fh)
    assert isinstance(frames, list) and set(frames[0]["outputs"]) == {"energy", "forces", "virial_stress"}


# ------------------------------------------------------------------------------------------------
# specs


def test_spec_resolution():
    assert resolve_dataset_spec("mlearn:Ge") == mlearn_dir() / "Ge-training.json.gz"
    assert resolve_dataset_spec("mlearn:Ge:train") == mlearn_dir() / "Ge-training.json.gz"
    assert resolve_dataset_spec("mlearn:ge:TEST") == mlearn_dir() / "Ge-test.json.gz"
    assert resolve_dataset_spec("mlearn:Cu:test") == mlearn_path("Cu", "test")
    assert resolve_dataset_spec(None) is None
    assert resolve_dataset_spec("data/train.extxyz") == "data/train.extxyz"  # paths unchanged
    assert is_dataset_spec("mlearn:Si") and not is_dataset_spec(Path("mlearn:Si"))
    assert detect_format("mlearn:Ge:test") == "mlearn"  # inferred, no format needed
    samples = list(read_dataset("mlearn:Ge:test"))
    assert len(samples) == 25 and samples[0].id == "Ge-test.json.gz:0"


def test_existing_file_named_like_a_spec_is_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("mlearn:Ge").write_text("[]")
    assert resolve_dataset_spec("mlearn:Ge") == "mlearn:Ge"


@pytest.mark.parametrize("spec, message", [
    ("mlearn:Xx", r"no bundled mlearn set for element 'Xx'; bundled: Cu \(test\), Ge \(train/test\)"),
    ("mlearn:Cu", r"mlearn:Cu: the mlearn Cu data has no train set \(only test\); use mlearn:Cu:test"),
    ("mlearn:Ge:valid", r"unknown split 'valid'"),
    ("mlearn:", r"expected mlearn:<element> or mlearn:<element>:test"),
    ("mlearn:Ge:test:1", r"expected mlearn:<element>"),
])
def test_bad_spec_is_a_clear_error(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_dataset_spec(spec)


def test_training_data_accepts_a_spec(tmp_path):
    """``--data mlearn:Ge`` reaches the graph cache (the hook in fastchgnet.train.job.prepare_data)."""
    import inspect

    from fastchgnet.train import prepare_data

    if "resolve_dataset_spec" not in inspect.getsource(prepare_data):
        pytest.skip("prepare_data does not resolve dataset specs yet (hook in fastchgnet/train/job.py)")
    cache = prepare_data("mlearn:Ge:test", cache_root=tmp_path, log=lambda m: None)
    assert len(cache) == 25
    with pytest.raises(ValueError, match="bundled: Cu"):
        prepare_data("mlearn:Xx", cache_root=tmp_path, log=lambda m: None)


# ------------------------------------------------------------------------------------------------
# the demo


def test_demo_table_has_both_rows():
    from fastchgnet.cli.demo import demo_table

    text = demo_table("mlearn Ge test set", [
        ("CHGNet 0.3.0, zero-shot", {"e_mae": 0.0123, "f_mae": 0.1, "s_mae": 0.5}),
        ("fine-tuned", {"e_mae": 0.004, "f_mae": 0.05, "s_mae": float("nan")})])
    lines = text.splitlines()
    assert "energy meV/atom" in lines[0] and "force meV/Å" in lines[0] and "stress GPa" in lines[0]
    assert lines[1].split()[-3:] == ["12.3", "100", "0.500"]
    assert lines[2].split()[-3:] == ["4.0", "50", "–"]


def test_demo_refuses_a_folder_holding_a_run(tmp_path):
    from fastchgnet.cli import main

    (tmp_path / "last.pt").write_bytes(b"x")
    assert main(["demo", "--out", str(tmp_path), "--epochs", "1"]) == 1
    assert (tmp_path / "last.pt").read_bytes() == b"x"


def test_demo_picks_a_new_run_folder(tmp_path, monkeypatch):
    from fastchgnet.cli.demo import _fresh_out

    monkeypatch.chdir(tmp_path)
    first = _fresh_out(None)
    assert re.fullmatch(r"runs/demo-\d{8}-\d{6}", first)
    Path(first).mkdir(parents=True)
    second = _fresh_out(None)
    assert second != first and not Path(second).exists()


def test_demo_fine_tunes_on_mlearn_and_prints_both_rows(tmp_path, monkeypatch, capsys):
    """The default demo's code path at a tiny budget: one epoch on 16 Ge structures."""
    from fastchgnet.cli import main

    monkeypatch.setenv("FASTCHGNET_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    assert main(["demo", "--epochs", "1", "--limit", "16", "--batch-size", "8", "--device", "cpu",
                 "--out", str(out), "--no-progress"]) == 0
    elapsed = time.perf_counter() - t0
    text = capsys.readouterr().out
    rows = {line.split("  ")[0]: line for line in text.splitlines()}
    zero = [r for k, r in rows.items() if k.startswith("CHGNet 0.3.0, zero-shot")]
    tuned = [r for k, r in rows.items() if k.startswith("fine-tuned, 1 epoch")]
    assert len(zero) == 1 and len(tuned) == 1, text
    for row in zero + tuned:
        e, f, s = (float(x) for x in row.split()[-3:])
        assert e >= 0 and f > 0 and s > 0
    assert "wall time:" in text and "parity plots:" in text and str(out / "best.pt") in text
    for name in ("best.pt", "last.pt", "metrics.csv", "test.json", "demo.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "demo.json").read_text())
    assert report["n_test"] == 25 and report["element"] == "Ge"
    assert json.loads((out / "test.json").read_text())["n_test"] == 25
    print(f"tiny demo: {elapsed:.1f} s")
