"""Graph cache: built once (in parallel), read back memory-mapped, identical to fresh graphs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import fastchgnet
from fastchgnet.data.cache import GraphCache, build_cache, cache_key, file_hash, open_or_build
from fastchgnet.data.prototypes import random_structures


@dataclass
class _Sample:
    structure: Any
    energy_per_atom: float | None
    forces: np.ndarray | None
    stress: np.ndarray | None
    magmom: np.ndarray | None
    id: str


def _samples(n=7, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i, s in enumerate(random_structures(n, seed=seed, max_atoms=16)):
        k = len(s)
        out.append(_Sample(s, float(rng.normal()), rng.normal(size=(k, 3)),
                           rng.normal(size=(3, 3)), None if i % 3 == 0 else rng.random(k),
                           f"s{i}"))
    return out


def _same_graph(a: fastchgnet.CrystalGraph, b: fastchgnet.CrystalGraph) -> None:
    for name in ("atomic_numbers", "positions", "lattice", "bond_src", "bond_dst", "bond_image",
                 "angle_center", "angle_bond1", "angle_bond2", "angle_sign1", "angle_sign2"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_allclose(a.bond_length, b.bond_length, rtol=1e-6)


@pytest.mark.parametrize("workers", [1, 2])
def test_cache_round_trip(tmp_path, workers):
    samples = _samples()
    cache = build_cache(samples, tmp_path, source_hash="abc", shard_size=3, workers=workers)
    assert len(cache) == len(samples)
    assert cache.shard_sizes == [3, 3, 1]
    for i, smp in enumerate(samples):
        got = cache[i]
        assert got.id == smp.id
        _same_graph(got.graph, fastchgnet.build_graph(smp.structure))
        assert got.energy_per_atom == pytest.approx(smp.energy_per_atom)
        np.testing.assert_allclose(got.forces, smp.forces, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got.stress, smp.stress, rtol=1e-6, atol=1e-6)
        if smp.magmom is None:
            assert got.magmom is None
        else:
            np.testing.assert_allclose(got.magmom, smp.magmom, rtol=1e-6)
    assert cache[-1].id == samples[-1].id
    with pytest.raises(IndexError):
        cache[len(samples)]


def test_cached_graphs_predict_like_fresh_ones(tmp_path):
    samples = _samples(4, seed=3)
    cache = build_cache(samples, tmp_path, source_hash="x", shard_size=2, workers=1)
    model = fastchgnet.CHGNet(fastchgnet.CHGNetConfig(
        atom_fea_dim=16, bond_fea_dim=16, angle_fea_dim=16, num_radial=7, num_angular=7, n_conv=2,
        atom_conv_hidden_dim=16, bond_conv_hidden_dim=16, mlp_hidden_dims=(16,)))
    a = model.predict([cache[i].graph for i in range(len(cache))], task="efs")
    b = model.predict([s.structure for s in samples], task="efs")
    for x, y in zip(a, b):
        for k in "efs":
            np.testing.assert_allclose(x[k], y[k], rtol=1e-5, atol=1e-6)


def test_sizes_and_reuse(tmp_path):
    samples = _samples(5, seed=1)
    cache = build_cache(samples, tmp_path, source_hash="h1", shard_size=2, workers=1)
    sizes = cache.sizes()
    expect = [(g.n_atoms, g.n_directed_bonds, g.n_angles)
              for g in fastchgnet.build_graphs([s.structure for s in samples])]
    np.testing.assert_array_equal(sizes, np.array(expect))
    # a second build with the same key reuses the cache without touching the samples
    again = build_cache(iter(()), tmp_path, source_hash="h1", shard_size=2, workers=1)
    assert len(again) == 5 and again.path == cache.path
    # another source hash or cutoff gives another key
    assert cache_key("h1", 6.0, 3.0) != cache_key("h2", 6.0, 3.0)
    assert cache_key("h1", 6.0, 3.0) != cache_key("h1", 5.0, 3.0)


def test_interrupted_build_keeps_finished_shards(tmp_path):
    samples = _samples(5, seed=2)
    key = cache_key("h", 6.0, 3.0)
    build_cache(samples[:2], tmp_path / "first", source_hash="h", shard_size=2, workers=1)
    # simulate a crash after the first shard: copy it without meta.json
    import shutil

    (tmp_path / "root" / key).mkdir(parents=True)
    shutil.copytree(tmp_path / "first" / key / "shard-00000", tmp_path / "root" / key / "shard-00000")
    cache = build_cache(samples, tmp_path / "root", source_hash="h", shard_size=2, workers=1)
    assert len(cache) == 5
    assert [cache[i].id for i in range(5)] == [s.id for s in samples]


def test_bad_structure_names_its_id(tmp_path):
    from pymatgen.core import Lattice, Structure

    samples = _samples(3)
    samples[1] = _Sample(Structure(Lattice.cubic(3.0), ["Na", "Cl"], [[0, 0, 0], [0.01, 0, 0]]),
                         0.0, None, None, None, "too-close")
    with pytest.raises(ValueError, match="too-close"):
        build_cache(samples, tmp_path, source_hash="bad", shard_size=2, workers=1)


def test_open_or_build_keys_on_file_content(tmp_path):
    src = tmp_path / "data.json"
    src.write_text(json.dumps({"v": 1}))
    calls = []

    def samples():
        calls.append(1)
        return _samples(2)

    c1 = open_or_build(samples, src, tmp_path / "cache", workers=1)
    c2 = open_or_build(samples, src, tmp_path / "cache", workers=1)
    assert c1.path == c2.path and len(calls) == 1
    src.write_text(json.dumps({"v": 2}))
    c3 = open_or_build(samples, src, tmp_path / "cache", workers=1)
    assert c3.path != c1.path and len(calls) == 2
    assert file_hash(src) in (c3.meta["source_hash"],)


def test_not_a_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a fastchgnet graph cache"):
        GraphCache(tmp_path)
