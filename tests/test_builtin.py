"""The built-in training dataset (fastchgnet/assets/builtin_dataset.npz) and its reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastchgnet.data.builtin import builtin_dataset_path, builtin_info, read_builtin
from fastchgnet.data.readers import BadEntry, Sample

MAX_BYTES = 15 * 1024 * 1024
# Labels (CHGNet 0.3.0, float32, batches of 16) against our exact model (float32, other batches):
# float32 rounding only.
TOL = {"e": 2e-5, "f": 5e-4, "s": 5e-3, "m": 5e-4}


@pytest.fixture(scope="module")
def arrays():
    path = builtin_dataset_path()
    assert path.is_file(), f"{path} is missing: run scripts/make_builtin_dataset.py"
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def samples():
    stats: dict = {}
    out = list(read_builtin(stats=stats))
    return out, stats


def test_file_size_and_location():
    path = builtin_dataset_path()
    assert path.name == "builtin_dataset.npz" and path.parent.name == "assets"
    assert path.parent.parent.name == "fastchgnet"
    assert 0 < path.stat().st_size <= MAX_BYTES


def test_contents(arrays):
    n = len(arrays["ids"])
    assert n >= 1900
    ptr = arrays["atom_ptr"]
    assert ptr.dtype == np.int64 and ptr.shape == (n + 1,) and ptr[0] == 0
    n_atoms = np.diff(ptr)
    assert n_atoms.min() >= 1 and n_atoms.max() <= 64
    n_total = int(ptr[-1])
    z = arrays["atomic_numbers"]
    assert z.dtype in (np.int8, np.int16) and z.shape == (n_total,)
    assert z.min() >= 1 and z.max() <= 94
    assert len(np.unique(z)) >= 60
    shapes = {"positions": (n_total, 3), "forces": (n_total, 3), "magmom": (n_total,),
              "lattice": (n, 3, 3), "stress": (n, 3, 3), "energy_per_atom": (n,)}
    dtypes = {"positions": np.float64, "lattice": np.float64, "energy_per_atom": np.float64,
              "forces": np.float32, "stress": np.float32, "magmom": np.float32}
    for k, shape in shapes.items():
        assert arrays[k].shape == shape, k
        assert arrays[k].dtype == dtypes[k], k
        assert np.isfinite(arrays[k]).all(), k
    assert len(set(arrays["ids"].tolist())) == n
    assert all(s.startswith(f"builtin-{i:05d}-") for i, s in enumerate(arrays["ids"].tolist()))
    # the rejection limits hold; magnetic moments are magnitudes
    assert np.abs(arrays["energy_per_atom"]).max() <= 20
    assert np.abs(arrays["forces"]).max() <= 50
    assert (arrays["magmom"] >= 0).all()
    assert (np.abs(np.linalg.det(arrays["lattice"])) > 1.0).all()


def test_meta(arrays):
    meta = builtin_info()
    assert meta == json.loads(str(arrays["meta"]))
    assert meta["model_version"] == "0.3.0"
    assert "not DFT" in meta["note"]
    assert meta["n_structures"] == len(arrays["ids"])
    assert meta["n_atoms"] == int(arrays["atom_ptr"][-1])
    assert meta["n_elements"] == len(np.unique(arrays["atomic_numbers"]))
    assert sum(meta["per_prototype"].values()) == meta["n_structures"]
    for k in ("script", "seed", "chgnet_version", "generated", "units", "rejected_total"):
        assert k in meta


def test_read_builtin(arrays, samples):
    out, stats = samples
    n = len(arrays["ids"])
    assert len(out) == n
    assert stats["read"] == n and stats["skipped"] == 0
    assert stats["missing"] == {"forces": 0, "stress": 0, "magmom": 0}
    path = str(builtin_dataset_path())
    for i in (0, n // 2, n - 1):
        s = out[i]
        assert isinstance(s, Sample)
        assert s.source == path
        assert s.id == f"builtin_dataset.npz:{arrays['ids'][i]}"
        a, b = arrays["atom_ptr"][i], arrays["atom_ptr"][i + 1]
        assert s.n_atoms == b - a
        assert [sp.Z for sp in s.structure.species] == arrays["atomic_numbers"][a:b].tolist()
        np.testing.assert_allclose(s.structure.cart_coords, arrays["positions"][a:b], atol=1e-10)
        np.testing.assert_allclose(s.structure.lattice.matrix, arrays["lattice"][i])
        assert s.energy_per_atom == arrays["energy_per_atom"][i]
        np.testing.assert_array_equal(s.forces, arrays["forces"][a:b])
        np.testing.assert_array_equal(s.stress, arrays["stress"][i])  # no sign flip
        np.testing.assert_array_equal(s.magmom, arrays["magmom"][a:b])
        assert s.info["index"] == i and s.info["prototype"]
    assert any("md_temperature_K" in s.info for s in out)


def test_read_builtin_bad_entry(tmp_path, arrays):
    """A corrupt entry is named (file and id), or skipped and counted."""
    bad = dict(arrays)
    bad["forces"] = arrays["forces"].copy()
    bad["forces"][0, 0] = np.nan
    path = tmp_path / "bad.npz"
    np.savez(path, **bad)
    first = str(arrays["ids"][0])
    with pytest.raises(BadEntry, match=f"bad.npz: entry {first}: forces contains NaN"):
        next(iter(read_builtin(path)))
    stats: dict = {}
    ids = [s.id for s in read_builtin(path, skip_bad=True, stats=stats)]
    assert len(ids) == len(arrays["ids"]) - 1 and f"bad.npz:{first}" not in ids
    assert stats["skipped"] == 1 and stats["reasons"] == {"non-finite": 1}


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_builtin(tmp_path / "nope.npz")


def test_labels_match_our_model(model, samples):
    """Our exact CHGNet 0.3.0 reproduces the stored (reference chgnet) labels."""
    out, _ = samples
    # a few structures spread over the dataset, one MD snapshot among them, up to 32 atoms
    small = [s for s in out if s.n_atoms <= 32]
    picks = [small[int(k)] for k in np.linspace(0, len(small) - 1, 4)]
    picks.append(next(s for s in out if "md_temperature_K" in s.info and s.n_atoms <= 32))
    preds = model.predict([s.structure for s in picks], task="efsm")
    for s, p in zip(picks, preds):
        assert abs(float(p["e"]) - s.energy_per_atom) <= TOL["e"], s.id
        np.testing.assert_allclose(p["f"], s.forces, rtol=0, atol=TOL["f"], err_msg=s.id)
        np.testing.assert_allclose(p["s"], s.stress, rtol=0, atol=TOL["s"], err_msg=s.id)
        np.testing.assert_allclose(np.abs(p["m"]).reshape(-1), s.magmom, rtol=0, atol=TOL["m"],
                                   err_msg=s.id)
