"""Dataset readers: formats, unit and sign conversions, streaming, and bad entries."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from fastchgnet.data import readers
from fastchgnet.data.readers import mptrj as mptrj_module
from fastchgnet.data.readers import (
    EV_PER_A3_TO_GPA,
    Sample,
    read_ase,
    read_dataset,
    read_mlearn,
    read_mptrj,
    samples_from_structures,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MLEARN_SI_TEST = SHARED_DATA / "mlearn" / "Si" / "test.json"


def si2() -> Structure:
    return Structure(Lattice.cubic(5.43), ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]])


def nacl3() -> Structure:
    return Structure(Lattice.cubic(5.6), ["Na", "Cl", "Na"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]])


# ------------------------------------------------------------------------------------------------
# MPtrj


def mptrj_frame(structure: Structure, *, seed: int, magmom: bool = True, per_atom: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    n = len(structure)
    e_tot = -5.0 * n + rng.normal()
    frame = {
        "structure": structure.as_dict(),
        "uncorrected_total_energy": e_tot + 0.3,
        "corrected_total_energy": e_tot,
        "force": rng.normal(size=(n, 3)).tolist(),
        "stress": rng.normal(scale=10, size=(3, 3)).tolist(),  # kBar, VASP sign
        "magmom": (rng.normal(size=n)).tolist() if magmom else None,
        "bandgap": 0.0,
    }
    if per_atom:
        frame["energy_per_atom"] = e_tot / n
    return frame


def mptrj_data() -> dict:
    return {
        "mp-149": {"mp-149-0-0": mptrj_frame(si2(), seed=0),
                   "mp-149-0-1": mptrj_frame(si2(), seed=1, magmom=False)},
        "mp-22862": {"mp-22862-0-0": mptrj_frame(nacl3(), seed=2, per_atom=False),
                     "mp-22862-1-0": mptrj_frame(nacl3(), seed=3)},
    }


def write_json(path: Path, data, **kw) -> Path:
    path.write_text(json.dumps(data, **kw), encoding="utf-8")
    return path


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1 << 20])
@pytest.mark.parametrize("indent", [None, 2])
def test_mptrj_labels_and_conversions(tmp_path, chunk_size, indent):
    data = mptrj_data()
    path = write_json(tmp_path / "mptrj.json", data, indent=indent)
    stats: dict = {}
    samples = list(read_mptrj(path, chunk_size=chunk_size, stats=stats))
    assert [s.id for s in samples] == ["mptrj.json:mp-149/mp-149-0-0", "mptrj.json:mp-149/mp-149-0-1",
                                       "mptrj.json:mp-22862/mp-22862-0-0",
                                       "mptrj.json:mp-22862/mp-22862-1-0"]
    assert stats["read"] == 4 and stats["skipped"] == 0
    assert stats["missing"] == {"forces": 0, "stress": 0, "magmom": 1}
    frames = [f for v in data.values() for f in v.values()]
    for smp, fr in zip(samples, frames):
        assert isinstance(smp, Sample)
        assert smp.source == str(path)
        n = len(fr["structure"]["sites"])
        assert smp.n_atoms == n
        # energy: energy_per_atom, else corrected_total_energy / n
        assert smp.energy_per_atom == pytest.approx(fr["corrected_total_energy"] / n, rel=1e-12)
        np.testing.assert_allclose(smp.forces, fr["force"])
        # kBar, VASP sign (+ = compressive) -> GPa, + = tensile
        np.testing.assert_allclose(smp.stress, -0.1 * np.asarray(fr["stress"]))
        if fr["magmom"] is None:
            assert smp.magmom is None
        else:
            np.testing.assert_allclose(smp.magmom, np.abs(fr["magmom"]))  # magnitudes
            assert (smp.magmom >= 0).all()
    assert samples[0].info == {"mp_id": "mp-149", "frame_id": "mp-149-0-0"}


def test_mptrj_energy_per_atom_preferred(tmp_path):
    fr = mptrj_frame(si2(), seed=0)
    fr["energy_per_atom"] = -4.25  # differs from corrected_total_energy / n: the per-atom key wins
    path = write_json(tmp_path / "m.json", {"mp-1": {"f0": fr}})
    (smp,) = read_mptrj(path)
    assert smp.energy_per_atom == -4.25


def test_mptrj_non_ascii_keys_small_chunks(tmp_path):
    data = {"mp-ü1": {"främe-0": mptrj_frame(si2(), seed=5)}, "mp-2": {"€": mptrj_frame(si2(), seed=6)}}
    path = write_json(tmp_path / "u.json", data, ensure_ascii=False)
    ids = [s.id for s in read_mptrj(path, chunk_size=3)]
    assert ids == ["u.json:mp-ü1/främe-0", "u.json:mp-2/€"]


def test_mptrj_gzip(tmp_path):
    import gzip

    path = tmp_path / "m.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        json.dump(mptrj_data(), fh)
    assert len(list(read_dataset(path))) == 4


class _Recorder:
    """A text file wrapper recording read() requests."""

    def __init__(self, fh):
        self.fh = fh
        self.requests: list[int] = []
        self.consumed = 0

    def read(self, n=-1):
        self.requests.append(n)
        out = self.fh.read(n)
        self.consumed += len(out)
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def test_mptrj_streams(tmp_path, monkeypatch):
    data = {f"mp-{i}": {f"mp-{i}-0": mptrj_frame(si2(), seed=i)} for i in range(60)}
    path = write_json(tmp_path / "big.json", data)
    size = len(path.read_text(encoding="utf-8"))
    entry_size = size / 60
    recs: list[_Recorder] = []
    real_open = mptrj_module._open_text  # read_mptrj looks it up in its own module

    def recording_open(p):
        recs.append(_Recorder(real_open(p)))
        return recs[-1]

    monkeypatch.setattr(mptrj_module, "_open_text", recording_open)
    chunk = 256
    it = read_mptrj(path, chunk_size=chunk)
    first = next(it)
    assert first.id == "big.json:mp-0/mp-0-0"
    (rec,) = recs
    # the first sample comes after reading about one entry, not the whole file
    assert rec.consumed < 0.1 * size, (rec.consumed, size)
    rest = list(it)
    assert len(rest) == 59
    assert rec.consumed == size
    assert all(0 < n for n in rec.requests)  # never read(-1): never the whole file at once
    # a read is one chunk, or (when an entry spans the buffer) at most the buffered part
    assert max(rec.requests) <= max(chunk, 2 * entry_size), (max(rec.requests), entry_size)


def test_mptrj_large_entry_geometric_growth(tmp_path, monkeypatch):
    """An entry much larger than the chunk is decoded a few times, not once per chunk."""
    frames = {f"f{k}": mptrj_frame(nacl3(), seed=k) for k in range(40)}
    path = write_json(tmp_path / "one.json", {"mp-1": frames})
    size = len(path.read_text(encoding="utf-8"))
    calls = []
    real = json.JSONDecoder.raw_decode

    def counting(self, s, idx=0):
        calls.append(idx)
        return real(self, s, idx)

    monkeypatch.setattr(json.JSONDecoder, "raw_decode", counting)
    samples = list(read_mptrj(path, chunk_size=16))
    assert len(samples) == 40
    # with a fixed 16-char step it would take size / 16 (> 1000) attempts
    assert size / 16 > 1000
    assert len(calls) < 40, len(calls)


@pytest.mark.parametrize("text, match", [
    ('{"mp-1": {"f": {"structure": 1}}', "truncated"),
    ('{"mp-1": {"f": {}} "mp-2": {}}', "invalid"),
    ('{"mp-1": {"f": {}}, }', "invalid"),
    ('{"mp-1": {"f": {}}} extra', "invalid"),
    ('{"mp-1": {"f": [1, 2,, 3]}}', "invalid"),
    ('"just a string"', "top level"),
    ('', "top level"),
])
def test_invalid_json_raises_naming_file(tmp_path, text, match):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as exc:
        list(read_mptrj(path, chunk_size=5, skip_bad=True))
    assert str(path) in str(exc.value)


def test_invalid_json_found_without_reading_whole_file(tmp_path, monkeypatch):
    good = json.dumps({"mp-0": {"f": mptrj_frame(si2(), seed=0)}})[1:-1]
    tail = json.dumps({f"mp-{i}": {"f": mptrj_frame(si2(), seed=i)} for i in range(1, 40)})[1:-1]
    text = "{" + good + ', "mp-x": {"f": {"structure": [1 2]}}, ' + tail + "}"
    path = tmp_path / "syntax.json"
    path.write_text(text)
    recs = []
    real_open = mptrj_module._open_text  # read_mptrj looks it up in its own module
    monkeypatch.setattr(mptrj_module, "_open_text",
                        lambda p: recs.append(_Recorder(real_open(p))) or recs[-1])
    it = read_mptrj(path, chunk_size=512)
    assert next(it).id == "syntax.json:mp-0/f"
    with pytest.raises(ValueError, match="invalid JSON"):
        next(it)
    assert recs[0].consumed < len(text) / 4


def test_empty_object_and_list(tmp_path):
    assert list(read_mptrj(write_json(tmp_path / "e.json", {}))) == []
    assert list(read_mlearn(write_json(tmp_path / "l.json", []))) == []


# ------------------------------------------------------------------------------------------------
# bad entries


def _bad_frames() -> dict:
    """{case: (frame, reason, words in the message)}"""
    cases = {}
    f = mptrj_frame(si2(), seed=9)
    del f["structure"]
    cases["no structure"] = (f, "missing key", "'structure'")
    f = mptrj_frame(si2(), seed=9)
    del f["energy_per_atom"], f["corrected_total_energy"]
    cases["no energy"] = (f, "missing key", "energy_per_atom")
    f = mptrj_frame(si2(), seed=9)
    f["force"] = np.zeros((3, 3)).tolist()
    cases["forces shape"] = (f, "bad shape", "forces has shape (3, 3), expected (2, 3)")
    f = mptrj_frame(si2(), seed=9)
    f["force"] = [[0, 0], [0, 0]]
    cases["forces columns"] = (f, "bad shape", "forces has shape (2, 2)")
    f = mptrj_frame(si2(), seed=9)
    f["energy_per_atom"] = float("nan")
    cases["nan energy"] = (f, "non-finite", "energy contains NaN")
    f = mptrj_frame(si2(), seed=9)
    f["energy_per_atom"] = float("inf")
    cases["inf energy"] = (f, "non-finite", "energy contains NaN or inf")
    f = mptrj_frame(si2(), seed=9)
    f["magmom"] = [0.1, float("nan")]
    cases["nan magmom"] = (f, "non-finite", "magmom")
    f = mptrj_frame(si2(), seed=9)
    f["stress"] = [[float("nan")] * 3] * 3
    cases["nan stress"] = (f, "non-finite", "stress")
    f = mptrj_frame(si2(), seed=9)
    f["stress"] = [1.0, 2.0, 3.0]
    cases["stress shape"] = (f, "bad shape", "stress has shape (3,)")
    f = mptrj_frame(si2(), seed=9)
    f["force"] = [["a", 0, 0], [0, 0, 0]]
    cases["non-numeric"] = (f, "bad value", "forces")
    f = mptrj_frame(Structure(Lattice.cubic(3.5), ["Am", "Si"], [[0, 0, 0], [0.5, 0.5, 0.5]]), seed=9)
    cases["Z=95"] = (f, "unknown element", "atomic number 95")
    f = mptrj_frame(si2(), seed=9)
    f["structure"]["sites"] = []
    f["force"], f["magmom"] = None, None
    cases["empty"] = (f, "empty structure", "empty")
    f = mptrj_frame(si2(), seed=9)
    f["structure"]["sites"][0]["species"][0]["element"] = "Xx"
    cases["bad symbol"] = (f, "bad structure", "structure")
    f = mptrj_frame(si2(), seed=9)
    f["structure"]["sites"][1]["xyz"] = [float("nan"), 0, 0]
    f["structure"]["sites"][1]["abc"] = [float("nan"), 0, 0]
    cases["nan coordinate"] = (f, "non-finite", "coordinate")
    return cases


BAD = _bad_frames()


@pytest.mark.parametrize("case", sorted(BAD))
def test_mptrj_bad_entry(tmp_path, case):
    frame, reason, words = BAD[case]
    data = mptrj_data()
    data["mp-bad"] = {"frame-7": frame}
    data["mp-after"] = {"f": mptrj_frame(si2(), seed=11)}
    path = write_json(tmp_path / "data.json", data)
    with pytest.raises(ValueError) as exc:
        list(read_mptrj(path, chunk_size=97))
    msg = str(exc.value)
    assert msg.startswith(f"{path}: entry mp-bad/frame-7: "), msg
    assert words in msg, msg
    assert exc.value.reason == reason

    stats: dict = {}
    ids = [s.id for s in read_mptrj(path, chunk_size=97, skip_bad=True, stats=stats)]
    # the bad entry is dropped, nothing is substituted, reading goes on after it
    assert ids == [f"data.json:{m}/{f}" for m, fr in data.items() for f in fr if m != "mp-bad"]
    assert stats["read"] == 5 and stats["skipped"] == 1
    assert stats["reasons"] == {reason: 1}
    assert "mp-bad/frame-7" in stats["examples"][reason]


def test_mptrj_entry_not_an_object(tmp_path):
    data = {"mp-1": {"f": mptrj_frame(si2(), seed=1)}, "mp-2": [1, 2], "mp-3": {"g": "text"}}
    path = write_json(tmp_path / "d.json", data)
    with pytest.raises(ValueError, match=r"d\.json: entry mp-2: value is a list"):
        list(read_mptrj(path))
    stats: dict = {}
    assert [s.id for s in read_mptrj(path, skip_bad=True, stats=stats)] == ["d.json:mp-1/f"]
    assert stats["skipped"] == 2 and stats["reasons"] == {"bad value": 2}


def test_stats_accumulate_across_files(tmp_path):
    a = write_json(tmp_path / "a.json", mptrj_data())
    b = write_json(tmp_path / "b.json", {"mp-9": {"x": BAD["nan energy"][0]}})
    stats: dict = {}
    n = sum(1 for p in (a, b) for _ in read_mptrj(p, skip_bad=True, stats=stats))
    assert n == 4 and stats["read"] == 4 and stats["skipped"] == 1
    assert stats["reasons"] == {"non-finite": 1}


# ------------------------------------------------------------------------------------------------
# mlearn


def mlearn_frame(structure: Structure, virial, *, energy=-10.8, seed=0, group="Elastic") -> dict:
    n = len(structure)
    rng = np.random.default_rng(seed)
    return {"structure": structure.as_dict(), "group": group, "num_atoms": n,
            "outputs": {"energy": energy, "forces": rng.normal(size=(n, 3)).tolist(),
                        "virial_stress": list(virial)}}


def test_mlearn_handmade(tmp_path):
    frames = [mlearn_frame(si2(), [10, 20, 30, 1, 2, 3], energy=-10.8),
              mlearn_frame(nacl3(), [0, 0, 0, 0, 0, 0], energy=-9.0, group="AIMD-NVT")]
    path = write_json(tmp_path / "ml.json", frames)
    s0, s1 = read_mlearn(path, chunk_size=11)
    assert s0.id == "ml.json:0" and s1.id == "ml.json:1"
    assert s0.energy_per_atom == pytest.approx(-5.4)  # total / n
    assert s1.energy_per_atom == pytest.approx(-3.0)
    # xx, yy, zz, xy, yz, zx in kBar, VASP sign -> GPa, + = tensile
    expected = -0.1 * np.array([[10, 1, 3], [1, 20, 2], [3, 2, 30]])
    np.testing.assert_allclose(s0.stress, expected)
    assert s0.magmom is None and s0.info["group"] == "Elastic"
    np.testing.assert_allclose(s1.forces, frames[1]["outputs"]["forces"])


def test_mlearn_bad_entries(tmp_path):
    frames = [mlearn_frame(si2(), [0] * 6), mlearn_frame(si2(), [0] * 5), mlearn_frame(si2(), [0] * 6)]
    frames[2]["num_atoms"] = 5
    frames.append(mlearn_frame(si2(), [0] * 6))
    del frames[3]["outputs"]["energy"]
    path = write_json(tmp_path / "ml.json", frames)
    with pytest.raises(ValueError, match=r"ml\.json: entry 1: virial_stress has shape \(5,\)"):
        list(read_mlearn(path))
    stats: dict = {}
    assert [s.id for s in read_mlearn(path, skip_bad=True, stats=stats)] == ["ml.json:0"]
    assert stats["reasons"] == {"bad shape": 2, "missing key": 1}


@pytest.fixture(scope="module")
def mlearn_si():
    if not MLEARN_SI_TEST.is_file():
        pytest.skip(f"shared mlearn data not found at {MLEARN_SI_TEST}")
    raw = json.loads(MLEARN_SI_TEST.read_text())
    return raw, list(read_dataset(MLEARN_SI_TEST))


def test_mlearn_si_test_set(mlearn_si):
    raw, samples = mlearn_si
    assert len(samples) == 25
    e = np.array([s.energy_per_atom for s in samples])
    # DFT Si: about -5.4 eV/atom near equilibrium; hot and strained AIMD frames lie higher
    assert ((e > -5.5) & (e < -4.4)).all(), e
    assert np.abs(e - -5.4).min() < 0.05
    for smp, fr in zip(samples, raw):
        assert smp.energy_per_atom == pytest.approx(fr["outputs"]["energy"] / fr["num_atoms"])
        v = np.asarray(fr["outputs"]["virial_stress"])
        np.testing.assert_allclose(np.diag(smp.stress), -0.1 * v[:3])
        np.testing.assert_allclose(smp.stress, smp.stress.T)
        assert smp.forces.shape == (fr["num_atoms"], 3) and smp.magmom is None


def test_mlearn_virial_order_matches_shear(mlearn_si):
    """In the sheared Elastic frames, the stress's off-diagonal must sit where the cell is tilted.

    A cell whose lattice row a has a component along axis b (a != b) is sheared in the (a, b) plane;
    the only non-zero shear stress must be σ_ab. This pins virial positions 3, 4, 5 to xy, yz, zx.
    """
    raw, samples = mlearn_si
    sheared = 0
    for smp, fr in zip(samples, raw):
        lat = np.asarray(fr["structure"]["lattice"]["matrix"])
        tilt = np.abs(lat - np.diag(np.diag(lat))) > 1e-6
        if fr["group"] != "Elastic" or not tilt.any():
            continue
        sheared += 1
        (a, b), = np.argwhere(tilt)
        off = np.abs(smp.stress) * (1 - np.eye(3)) > 1e-3
        assert off[a, b] and off[b, a] and off.sum() == 2, (fr["structure"]["lattice"], smp.stress)
    assert sheared == 3


def test_mlearn_virial_order_agrees_with_chgnet(mlearn_si, ref_model):
    """CHGNet 0.3.0's shear stresses on the sheared Elastic frames line up with the labels."""
    raw, samples = mlearn_si
    picks = [s for s, fr in zip(samples, raw) if fr["group"] == "Elastic"
             and np.abs(np.triu(s.stress, 1)).max() > 1.0]
    assert len(picks) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # chgnet's own tensor-to-scalar warning
        preds = ref_model.predict_structure([s.structure for s in picks], task="efs", batch_size=3)
    iu = np.triu_indices(3, 1)
    lab = np.concatenate([s.stress[iu] for s in picks])
    pred = np.concatenate([np.asarray(p["s"])[iu] for p in preds])
    assert np.corrcoef(lab, pred)[0, 1] > 0.95
    assert (np.sign(lab[np.abs(lab) > 1]) == np.sign(pred[np.abs(lab) > 1])).all()


# ------------------------------------------------------------------------------------------------
# ASE: extxyz and database


def _atoms(structure: Structure):
    from pymatgen.io.ase import AseAtomsAdaptor

    return AseAtomsAdaptor.get_atoms(structure)


def test_extxyz_ref_keys(tmp_path):
    import ase.io

    frames = []
    for k, s in enumerate([si2(), nacl3()]):
        a = _atoms(s)
        n = len(a)
        a.info["REF_energy"] = -4.0 * n - k
        a.arrays["REF_forces"] = np.full((n, 3), 0.5 + k)
        a.info["REF_stress"] = np.array([1.0, 2.0, 3.0, 0.1, 0.2, 0.3]) * (k + 1)  # kBar, VASP sign
        a.arrays["REF_magmoms"] = -np.arange(n, dtype=float)
        frames.append(a)
    path = tmp_path / "ref.xyz"
    ase.io.write(path, frames, format="extxyz")
    samples = list(read_dataset(path, energy_key="REF_energy", forces_key="REF_forces",
                                stress_key="REF_stress", magmom_key="REF_magmoms",
                                stress_unit="kBar", stress_sign="vasp"))
    assert [s.id for s in samples] == ["ref.xyz:0", "ref.xyz:1"]
    for k, (smp, a) in enumerate(zip(samples, frames)):
        n = len(a)
        assert smp.energy_per_atom == pytest.approx((-4.0 * n - k) / n)  # total -> per atom
        np.testing.assert_allclose(smp.forces, a.arrays["REF_forces"])
        # ASE Voigt (xx, yy, zz, yz, xz, xy), kBar with VASP sign -> GPa, + = tensile
        v = -0.1 * (k + 1) * np.array([1.0, 2.0, 3.0, 0.1, 0.2, 0.3])
        expected = np.array([[v[0], v[5], v[4]], [v[5], v[1], v[3]], [v[4], v[3], v[2]]])
        np.testing.assert_allclose(smp.stress, expected)
        np.testing.assert_allclose(smp.magmom, np.arange(n))
        assert smp.structure.composition == Structure.from_dict(_struct_dict(a)).composition
    # index selection keeps the file's frame numbers in the ids
    (only,) = read_ase(path, index="1:", energy_key="REF_energy")
    assert only.id == "ref.xyz:1" and only.forces is None and only.stress is None


def _struct_dict(atoms):
    from pymatgen.io.ase import AseAtomsAdaptor

    return AseAtomsAdaptor.get_structure(atoms).as_dict()


def test_extxyz_single_point_calculator(tmp_path):
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    a = _atoms(nacl3())
    voigt = np.array([0.01, 0.02, 0.03, 0.004, 0.005, 0.006])  # eV/Å^3, ASE sign
    forces = np.arange(9.0).reshape(3, 3)
    a.calc = SinglePointCalculator(a, energy=-12.0, forces=forces, stress=voigt,
                                   magmoms=np.array([1.0, -2.0, 0.5]))
    path = tmp_path / "spc.extxyz"
    ase.io.write(path, [a], format="extxyz")
    (smp,) = read_ase(path)
    assert smp.energy_per_atom == pytest.approx(-4.0)
    np.testing.assert_allclose(smp.forces, forces)
    s = voigt * EV_PER_A3_TO_GPA
    np.testing.assert_allclose(smp.stress, [[s[0], s[5], s[4]], [s[5], s[1], s[3]], [s[4], s[3], s[2]]])
    np.testing.assert_allclose(smp.magmom, [1.0, 2.0, 0.5])


def test_ase_stress_sign_is_tensile_positive(tmp_path):
    """A compressed cell has negative stress in ASE and in the samples (CHGNet sign)."""
    import ase.io
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for a0 in (3.45, 3.75):  # EMT Cu equilibrium is about 3.59 Å
        at = bulk("Cu", "fcc", a=a0, cubic=True)
        at.calc = EMT()
        e, f, s = at.get_potential_energy(), at.get_forces(), at.get_stress()
        at.calc = SinglePointCalculator(at, energy=e, forces=f, stress=s)
        frames.append(at)
    path = tmp_path / "cu.xyz"
    ase.io.write(path, frames)
    comp, expd = read_ase(path)
    assert (np.diag(comp.stress) < 0).all() and (np.diag(expd.stress) > 0).all()
    np.testing.assert_allclose(comp.stress[0, 0], frames[0].calc.results["stress"][0] * 160.21766208)


def test_stress_unit_and_sign_options(tmp_path):
    import ase.io

    a = _atoms(si2())
    a.info["E"] = -10.0
    a.info["S"] = np.eye(3) * 2.0
    path = tmp_path / "s.xyz"
    ase.io.write(path, [a])
    for unit, sign, gpa in [("eV/A3", "ase", 2.0 * 160.21766208), ("GPa", "chgnet", 2.0),
                            ("kBar", "ase", 0.2), ("kBar", "vasp", -0.2), ("GPa", "vasp", -2.0)]:
        (smp,) = read_ase(path, energy_key="E", stress_key="S", stress_unit=unit, stress_sign=sign)
        np.testing.assert_allclose(smp.stress, np.eye(3) * gpa)
    with pytest.raises(ValueError, match="stress_unit"):
        read_ase(path, stress_unit="bar")
    with pytest.raises(ValueError, match="stress_sign"):
        read_ase(path, stress_sign="up")


def test_extxyz_bad_entries(tmp_path):
    import ase.io

    frames = []
    for k in range(5):
        a = _atoms(si2())
        a.info["REF_energy"] = -10.0 - k
        a.arrays["REF_forces"] = np.zeros((2, 3))
        frames.append(a)
    frames[1].info["REF_energy"] = float("nan")
    del frames[2].info["REF_energy"]
    frames[3].info["REF_stress"] = np.array([1.0, 2.0])
    path = tmp_path / "bad.xyz"
    ase.io.write(path, frames)
    with pytest.raises(ValueError, match=rf"{path}: entry 1: energy contains NaN"):
        list(read_ase(path, energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress"))
    stats: dict = {}
    got = list(read_ase(path, energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress",
                        skip_bad=True, stats=stats))
    assert [s.id for s in got] == ["bad.xyz:0", "bad.xyz:4"]
    assert stats["reasons"] == {"non-finite": 1, "missing key": 1, "bad shape": 1}
    assert stats["missing"]["stress"] == 2


def test_extxyz_unknown_element_and_no_cell(tmp_path):
    import ase.io
    from ase import Atoms

    a = _atoms(si2())
    a.numbers[0] = 95  # Am
    a.info["REF_energy"] = -1.0
    mol = Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]], pbc=False)
    mol.info["REF_energy"] = -1.0
    path = tmp_path / "z.xyz"
    ase.io.write(path, [a, mol])
    stats: dict = {}
    assert list(read_ase(path, energy_key="REF_energy", skip_bad=True, stats=stats)) == []
    assert stats["reasons"] == {"unknown element": 1, "bad structure": 1}
    with pytest.raises(ValueError, match=r"z\.xyz: entry 0: structure has atomic number 95"):
        list(read_ase(path, energy_key="REF_energy"))


def test_ase_db(tmp_path):
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.db import connect

    path = tmp_path / "train.db"
    db = connect(path)
    structs = [si2(), nacl3(), si2()]
    for k, s in enumerate(structs):
        a = _atoms(s)
        n = len(a)
        a.calc = SinglePointCalculator(a, energy=-3.0 * n, forces=np.full((n, 3), float(k)),
                                       stress=np.array([0.01, 0.0, 0.0, 0.0, 0.0, 0.0]))
        db.write(a, key_value_pairs={"dft_energy": -2.0 * n}, data={"dft_forces": np.ones((n, 3))})
    stats: dict = {}
    samples = list(read_dataset(path, stats=stats))
    assert [s.id for s in samples] == ["train.db:1", "train.db:2", "train.db:3"]
    assert all(s.energy_per_atom == pytest.approx(-3.0) for s in samples)
    np.testing.assert_allclose(samples[1].forces, np.ones((3, 3)))
    np.testing.assert_allclose(samples[0].stress[0, 0], 0.01 * EV_PER_A3_TO_GPA)
    assert stats["read"] == 3 and stats["missing"]["magmom"] == 3
    # custom keys from the rows' key-value pairs and data; an index selection
    picked = list(read_ase(path, index="1:", energy_key="dft_energy", forces_key="dft_forces"))
    assert [s.id for s in picked] == ["train.db:2", "train.db:3"]
    assert picked[0].energy_per_atom == pytest.approx(-2.0)
    np.testing.assert_allclose(picked[0].forces, np.ones((3, 3)))
    (last,) = read_ase(path, index=-1)
    assert last.id == "train.db:3"


# ------------------------------------------------------------------------------------------------
# in-memory structures and dispatch


def test_samples_from_structures():
    structs = [si2(), nacl3()]
    stress = np.arange(9.0).reshape(3, 3)
    samples = samples_from_structures(structs, [-5.4, -3.2], forces=[np.zeros((2, 3)), None],
                                      stresses=[stress, None], magmoms=[None, [1.0, -1.0, 0.0]],
                                      ids=["a", "b"])
    assert [s.id for s in samples] == ["a", "b"]
    assert samples[0].energy_per_atom == -5.4
    np.testing.assert_allclose(samples[0].stress, stress)  # GPa, CHGNet sign: unchanged
    assert samples[1].forces is None and samples[1].stress is None
    np.testing.assert_allclose(samples[1].magmom, [1.0, 1.0, 0.0])
    tot = samples_from_structures(structs, [-10.8, -9.6], energy_is_total=True)
    assert [s.energy_per_atom for s in tot] == pytest.approx([-5.4, -3.2])
    with pytest.raises(ValueError, match="energies has 1 entries for 2 structures"):
        samples_from_structures(structs, [-1.0])
    with pytest.raises(ValueError, match=r"<memory>: entry b: forces has shape"):
        samples_from_structures(structs, [-1.0, -1.0], forces=[None, np.zeros((2, 3))], ids=["a", "b"])
    stats: dict = {}
    kept = samples_from_structures(structs, [math.nan, -1.0], skip_bad=True, stats=stats)
    assert [s.id for s in kept] == ["1"] and stats["reasons"] == {"non-finite": 1}


def test_read_dataset_auto(tmp_path):
    import ase.io

    mp = write_json(tmp_path / "a.json", mptrj_data())
    ml = write_json(tmp_path / "b.json", [mlearn_frame(si2(), [0] * 6)])
    a = _atoms(si2())
    a.info["energy"] = -1.0
    xyz = tmp_path / "c.xyz"
    ase.io.write(xyz, [a])
    assert readers.detect_format(mp) == "mptrj"
    assert readers.detect_format(ml) == "mlearn"
    assert readers.detect_format(xyz) == "extxyz"
    assert readers.detect_format(tmp_path / "d.db") == "asedb"
    assert len(list(read_dataset(mp, chunk_size=50))) == 4
    assert [s.id for s in read_dataset(ml)] == ["b.json:0"]
    assert list(read_dataset(xyz))[0].energy_per_atom == pytest.approx(-0.5)
    assert len(list(read_dataset(ml, format="mlearn"))) == 1
    odd = write_json(tmp_path / "odd.json", {"a": 1})
    with pytest.raises(ValueError, match="cannot tell the dataset format"):
        read_dataset(odd)
    with pytest.raises(ValueError, match="unknown dataset format"):
        read_dataset(mp, format="csv")
