"""Data, weights and cache safety (issue 16, cases 7, 9, 10, 11): each case is reproduced first.

* 7: a file named like a pretrained model does not replace the published weights;
* 10: flat, tiny or scaled cells raise a clear error before any neighbour search, instead of
  running until the machine kills the process for memory;
* 11: damaged caches, concurrent cache builds, full disks, truncated checkpoints;
* 9: the cache's meta.json counts every label; CIFs with several data blocks are read whole.

Cases that would exhaust memory on a regression run under a cap on the address space (Linux), so
that a regression fails the test with a MemoryError instead of taking the machine down.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

import fastchgnet
from fastchgnet.data.cache import DamagedCacheError, GraphCache, build_cache, open_or_build
from fastchgnet.data.graph import graph_size_problems
from fastchgnet.data.prototypes import make as _make
from fastchgnet.data.readers import read_ase, samples_from_structures

from conftest import shared_cif_paths


@functools.lru_cache(maxsize=None)
def _proto(prototype: str, elements: tuple, supercell: object, rattle: float, seed: int) -> Structure:
    return _make(prototype, list(elements), supercell=supercell, rattle=rattle, seed=seed)


def make(prototype: str, elements: list, *, supercell: object = 1, rattle: float = 0.0,
         seed: int = 0) -> Structure:
    """``prototypes.make``, memoised (pymatgen's space-group set-up takes ~1 s per call); the
    structures are never modified."""
    return _proto(prototype, tuple(elements), supercell, rattle, seed)


@contextlib.contextmanager
def memory_cap(extra: int = 2 * 2**30):
    """Cap the address space at its current size + ``extra`` (Linux; elsewhere no cap)."""
    if not sys.platform.startswith("linux"):
        yield
        return
    import resource

    status = Path("/proc/self/status").read_text()
    vm = int(re.search(r"VmSize:\s+(\d+) kB", status).group(1)) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + extra if hard == resource.RLIM_INFINITY else min(vm + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def file_size_cap(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG ("File too large"), as a full disk fails with
    ENOSPC: a real failed write, from the operating system (POSIX only)."""
    resource = pytest.importorskip("resource")
    if not hasattr(signal, "SIGXFSZ"):
        pytest.skip("no SIGXFSZ")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def tiny_config() -> fastchgnet.CHGNetConfig:
    return fastchgnet.CHGNetConfig(atom_fea_dim=16, bond_fea_dim=16, angle_fea_dim=16, num_radial=7,
                                   num_angular=7, n_conv=2, atom_conv_hidden_dim=16,
                                   bond_conv_hidden_dim=16, mlp_hidden_dims=(16,))


def flat_cell() -> Structure:
    """Two Li atoms in a 3 x 3 Å cell with c = 1e-6 Å (a collapsed axis)."""
    return Structure(Lattice([[3, 0, 0], [0, 3, 0], [0, 0, 1e-6]]), ["Li", "Li"],
                     [[0, 0, 0], [0.5, 0.5, 0]])


def scaled_cell(factor: float = 0.01) -> Structure:
    """A layered LiCoO2-type crystal with its lattice multiplied by ``factor`` (wrong unit)."""
    s = make("layered", ["Li", "Co", "O"])
    return Structure(Lattice(s.lattice.matrix * factor), s.species, s.frac_coords)


# ------------------------------------------------------------------------------------------------
# case 7: a file named like a pretrained model


def test_pretrained_name_means_the_published_weights_even_with_such_a_file(tmp_path, monkeypatch,
                                                                               caplog):
    torch.manual_seed(0)
    small = fastchgnet.CHGNet(tiny_config())
    monkeypatch.chdir(tmp_path)
    fastchgnet.save_checkpoint(small, tmp_path / "0.3.0")
    with caplog.at_level(logging.WARNING, logger="fastchgnet"):
        net = fastchgnet.load_model("0.3.0")
    assert net.config.atom_fea_dim == 64 and net.version == "0.3.0"  # the published weights
    msg = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "published" in msg and "./0.3.0" in msg and "Path('0.3.0')" in msg, msg
    for name in ("./0.3.0", Path("0.3.0"), tmp_path / "0.3.0"):
        mine = fastchgnet.load_model(name)
        assert mine.config.atom_fea_dim == 16, name
        for k, v in small.state_dict().items():
            assert torch.equal(mine.state_dict()[k], v), (name, k)


def test_pretrained_name_without_such_a_file_does_not_warn(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fastchgnet"):
        fastchgnet.load_model("0.3.0")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with pytest.raises(FileNotFoundError, match="pass the string '0.3.0'"):
        fastchgnet.load_model(Path("0.3.0"))  # a Path is a file, and there is none


# ------------------------------------------------------------------------------------------------
# case 10: flat and tiny cells


def test_flat_cell_raises_naming_structure_and_height_not_exhausting_memory():
    with memory_cap(), pytest.raises(ValueError) as info:
        fastchgnet.build_graph(flat_cell(), index=3, graph_id="flat-1")
    msg = str(info.value)
    assert "structure 3" in msg and "flat-1" in msg and "(Li2)" in msg, msg
    assert "cell height 1e-06 Å along c" in msg and "closer than 0.5 Å" in msg, msg


def test_flat_cell_without_min_distance_raises_on_the_images():
    with memory_cap(), pytest.raises(ValueError, match=r"cell height 1e-06 Å along c.*periodic "
                                                       r"images along c"):
        fastchgnet.build_graph(flat_cell(), min_distance=0.0)


def test_scaled_cell_raises_before_the_neighbour_search():
    with memory_cap(), pytest.raises(ValueError) as info:
        fastchgnet.build_graphs([make("rocksalt", ["Na", "Cl"]), scaled_cell()], ids=["ok", "x100"])
    msg = str(info.value)
    assert "1 of 2" in msg and "structure 1" in msg and "x100" in msg and "(Li3Co3O6)" in msg, msg
    assert re.search(r"atoms/Å\^3, more than atoms at least 0.5 Å apart can fill", msg), msg


def test_tiny_cell_without_min_distance_raises_on_the_memory_estimate():
    tiny = Structure(Lattice.cubic(0.3), ["H"], [[0, 0, 0]])
    with memory_cap(), pytest.raises(ValueError, match=r"bonds within 6 Å .* would need ≈ [\d.]+ GB"):
        fastchgnet.build_graph(tiny, min_distance=0.0)


def test_predict_names_the_flat_structure(small_model):
    with memory_cap(), pytest.raises(ValueError) as info:
        small_model.predict([make("fcc", ["Cu"]), flat_cell()], ids=["cu", "the-flat-one"])
    msg = str(info.value)
    assert "structure 1" in msg and "the-flat-one" in msg and "cell height" in msg, msg


def test_device_builder_raises_for_flat_and_scaled_cells(small_model):
    from fastchgnet.data.device_graph import device_batch, make_builder

    with memory_cap():
        with pytest.raises(ValueError, match=r"structure 1 has cell height 1e-06 Å along c"):
            device_batch([make("fcc", ["Cu"]), flat_cell()])
        with pytest.raises(ValueError, match=r"structure 0 .*periodic images along c"):
            device_batch([flat_cell()], min_distance=0.0)
        with pytest.raises(ValueError, match=r"structure Li2 has cell height"):
            make_builder(small_model)(flat_cell())
        with pytest.raises(ValueError, match=r"structure 0 has a cell of .* closer than 0.5 Å"):
            device_batch([scaled_cell()])


def real_crystals() -> dict[str, Structure]:
    out = {
        "diamond-C": make("diamond", ["C"]),
        "fcc-Cu-supercell": make("fcc", ["Cu"], supercell=3),
        "hcp-Os": make("hcp", ["Os"]),
        "bcc-W": make("bcc", ["W"], supercell=2),
        "primitive-fcc-Cu": Structure(Lattice([[0, 1.805, 1.805], [1.805, 0, 1.805],
                                               [1.805, 1.805, 0]]), ["Cu"], [[0, 0, 0]]),
        "primitive-diamond-C": Structure(Lattice([[0, 1.7835, 1.7835], [1.7835, 0, 1.7835],
                                                  [1.7835, 1.7835, 0]]), ["C", "C"],
                                         [[0, 0, 0], [0.25, 0.25, 0.25]]),
        "layered-LiCoO2-4x4x1": make("layered", ["Li", "Co", "O"], supercell=(4, 4, 1)),
    }
    for name, path in shared_cif_paths().items():
        out[name] = Structure.from_file(path)
        if name == "Li9Co7O16":
            big = out[name].copy()
            big.make_supercell(3)  # 864 atoms
            out[name + "-3x3x3"] = big
    return out


def test_real_crystals_are_far_from_every_bound():
    from fastchgnet.data.device_graph import device_batch
    from fastchgnet.data.graph import (MAX_GRAPH_BYTES_PER_ATOM, MAX_IMAGES, cell_heights,
                                       structure_arrays)

    for name, s in real_crystals().items():
        g = fastchgnet.build_graph(s, graph_id=name)
        assert g.n_bonds > 0, name
        # ten times denser, or with ten times more images, they would still pass
        _, pos, lat, pbc = structure_arrays(s)
        vol, h = cell_heights(lat)
        assert not graph_size_problems(len(s), vol / 10, h, pbc, min_distance=0.05), name
        assert np.prod(2 * np.ceil(6.0 / h) + 1) * 10 < MAX_IMAGES, name
        per_atom = (g.n_directed_bonds * 200 + g.n_angles * 80) / len(s)
        assert per_atom * 100 < MAX_GRAPH_BYTES_PER_ATOM, name
    small = {k: v for k, v in real_crystals().items() if len(v) <= 64}
    device_batch(list(small.values()), dtype=torch.float64)


def test_atoms_far_outside_the_cell_give_the_same_graph_in_bounded_memory():
    s = make("rocksalt", ["Na", "Cl"], rattle=0.03, seed=0)
    frac = s.frac_coords.copy()
    frac[0] += [1000.0, -700.0, 3.0]  # unwrapped MD coordinates
    moved = Structure(s.lattice, s.species, frac)
    with memory_cap(1 * 2**30):
        g = fastchgnet.build_graph(moved)
    ref = fastchgnet.build_graph(s)

    def vectors(graph):
        v = graph.positions[graph.bond_src] - graph.positions[graph.bond_dst] - graph.bond_image @ graph.lattice
        v = np.concatenate([v, -v])  # both directions: the canonical one may differ
        return v[np.lexsort(np.round(v, 6).T)]

    assert g.n_bonds == ref.n_bonds and g.n_angles == ref.n_angles
    np.testing.assert_allclose(vectors(g), vectors(ref), atol=1e-6)
    np.testing.assert_allclose(np.sort(g.bond_length), np.sort(ref.bond_length), atol=1e-9)


# ------------------------------------------------------------------------------------------------
# case 11: checkpoints


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.9], ids=["empty", "half", "90-percent"])
def test_truncated_checkpoint_says_so(tmp_path, keep):
    path = fastchgnet.save_checkpoint(fastchgnet.CHGNet(tiny_config()), tmp_path / "run" / "last.pt")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is truncated or not a checkpoint"):
        fastchgnet.load_model(path)


def test_failed_checkpoint_write_is_an_oserror_and_keeps_the_previous_file(tmp_path):
    torch.manual_seed(0)
    first = fastchgnet.CHGNet(tiny_config())
    path = fastchgnet.save_checkpoint(first, tmp_path / "last.pt")
    before = path.read_bytes()
    torch.manual_seed(1)
    second = fastchgnet.CHGNet(tiny_config())
    with file_size_cap(len(before) // 2), pytest.raises(OSError) as info:
        fastchgnet.save_checkpoint(second, path)
    msg = str(info.value)
    assert str(path) in msg and "previous last.pt is intact" in msg, msg
    assert "File too large" in msg and info.value.errno is not None, msg
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no partial file left
    with file_size_cap(len(before) // 2), pytest.raises(OSError, match="no new.pt was written"):
        fastchgnet.save_checkpoint(second, tmp_path / "new.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


# ------------------------------------------------------------------------------------------------
# case 11: graph caches


def _samples(n: int = 6, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    structs = [make(p, e, rattle=0.03, seed=i) for i, (p, e) in enumerate(
        [("rocksalt", ["Na", "Cl"]), ("fcc", ["Cu"]), ("perovskite", ["Sr", "Ti", "O"]),
         ("bcc", ["Fe"]), ("diamond", ["Si"]), ("fluorite", ["Ca", "F"]),
         ("cscl", ["Cs", "Cl"]), ("hcp", ["Mg"])][:n])]
    return samples_from_structures(
        structs, energies=list(rng.normal(size=n)),
        forces=[rng.normal(size=(len(s), 3)) for s in structs],
        stresses=[None if i % 2 else rng.normal(size=(3, 3)) for i in range(n)],
        ids=[f"s{i}" for i in range(n)])


def _built(tmp_path: Path, **kw) -> GraphCache:
    return build_cache(_samples(), tmp_path / "root", source_hash="h", shard_size=2, workers=1, **kw)


def _same_cache(a: GraphCache, b: GraphCache) -> None:
    assert a.ids == b.ids
    for i in range(len(a)):
        x, y = a[i], b[i]
        np.testing.assert_array_equal(x.graph.bond_src, y.graph.bond_src)
        np.testing.assert_array_equal(x.graph.angle_bond2, y.graph.angle_bond2)
        np.testing.assert_array_equal(x.forces, y.forces)


DAMAGE = {
    "truncated-array": (lambda p: p.joinpath("shard-00001", "positions.npy").write_bytes(
        p.joinpath("shard-00001", "positions.npy").read_bytes()[:100]), "shard-00001/positions.npy"),
    "missing-array": (lambda p: p.joinpath("shard-00000", "forces.npy").unlink(),
                      "shard-00000/forces.npy"),
    "missing-shard": (lambda p: shutil.rmtree(p / "shard-00002"), "shard-00002"),
    "truncated-meta": (lambda p: p.joinpath("meta.json").write_text(
        p.joinpath("meta.json").read_text()[:40]), "meta.json"),
    "short-pointers": (lambda p: np.save(p / "shard-00000" / "bond_ptr.npy",
                                         np.load(p / "shard-00000" / "bond_ptr.npy")[:2]),
                       "shard-00000/bond_ptr.npy"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_cache_names_folder_and_file_on_open(tmp_path, case):
    cache = _built(tmp_path)
    damage, name = DAMAGE[case]
    damage(cache.path)
    for opener in (lambda: GraphCache(cache.path), lambda: _built(tmp_path)):
        with pytest.raises(DamagedCacheError) as info:
            opener()
        msg = str(info.value)
        assert str(cache.path) in msg and name in msg and "Delete the folder" in msg, msg


def test_short_ids_file_names_the_file(tmp_path):
    cache = _built(tmp_path)
    ids = cache.path / "shard-00001" / "ids.json"
    ids.write_text(json.dumps(json.loads(ids.read_text())[:1]))
    reopened = GraphCache(cache.path)
    with pytest.raises(DamagedCacheError, match=r"shard-00001/ids.json: 1 ids, expected 2"):
        reopened[3]


def test_two_builds_of_the_same_cache_at_once(tmp_path):
    """Both callers get the same complete cache: one builds, the other waits and opens it."""
    barrier = threading.Barrier(2)

    def samples():
        for k, smp in enumerate(_samples()):
            if k == 0:  # let both builders start before either writes a shard
                with contextlib.suppress(threading.BrokenBarrierError):
                    barrier.wait(timeout=1.0)
            yield smp

    results, errors = {}, {}

    def run(name):
        try:
            results[name] = build_cache(samples(), tmp_path / "root", source_hash="same",
                                        shard_size=1, workers=1)
        except BaseException as exc:  # noqa: BLE001 -- reported below
            errors[name] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    a, b = results["a"], results["b"]
    assert a.path == b.path and len(a) == 6
    _same_cache(a, b)
    _same_cache(a, build_cache(_samples(), tmp_path / "fresh", source_hash="same", shard_size=1,
                               workers=1))
    assert not list(a.path.glob("*.tmp*"))


def test_full_disk_during_a_build_loses_nothing_and_resumes(tmp_path):
    root = tmp_path / "root"
    with file_size_cap(2000), pytest.raises(OSError) as info:
        build_cache(_samples(), root, source_hash="h", shard_size=2, workers=1)
    msg = str(info.value)
    assert "could not write graph cache" in msg and "File too large" in msg, msg
    assert "Nothing was lost" in msg and str(root) in msg, msg
    (key,) = [p for p in root.iterdir() if p.is_dir()]
    assert not list(key.glob("*.tmp*")) and not (key / "meta.json").exists()
    cache = build_cache(_samples(), root, source_hash="h", shard_size=2, workers=1)
    _same_cache(cache, _built(tmp_path / "fresh"))


def test_interrupted_build_resumed_with_another_shard_size(tmp_path):
    def first_three():
        for k, smp in enumerate(_samples()):
            if k == 3:
                raise KeyboardInterrupt  # the first build dies after one shard
            yield smp

    with pytest.raises(KeyboardInterrupt):
        build_cache(first_three(), tmp_path / "root", source_hash="h", shard_size=2, workers=1)
    cache = build_cache(_samples(), tmp_path / "root", source_hash="h", shard_size=4, workers=1)
    assert cache.ids == [s.id for s in _samples()]  # each sample once, in order
    assert cache.shard_sizes == [4, 2]


# ------------------------------------------------------------------------------------------------
# case 9: label counts in the cache, CIF blocks


def test_cache_meta_counts_every_label(tmp_path):
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    frames = []
    for i in range(4):
        a = Atoms("NaCl", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]], cell=np.eye(3) * (4.0 + 0.1 * i),
                  pbc=True)
        a.calc = SinglePointCalculator(a, energy=-3.0 - i, forces=np.zeros((2, 3)),
                                       stress=np.full(6, 0.01))
        frames.append(a)
    path = tmp_path / "train.xyz"
    write(path, frames, format="extxyz")
    stats: dict = {}
    samples = read_ase(path, stress_key="strss", stats=stats)  # misspelled in every frame
    cache = build_cache(samples, tmp_path / "root", source_hash="xyz", workers=1)
    assert cache.meta["n_samples"] == 4
    assert cache.meta["labels"] == {"e": 4, "f": 4, "s": 0, "m": 0}
    assert cache.label_counts() == cache.meta["labels"]
    assert stats["missing"]["stress"] == 4
    # a cache written before meta["labels"] existed: counted from the shards
    meta = dict(cache.meta)
    del meta["labels"]
    (cache.path / "meta.json").write_text(json.dumps(meta))
    assert GraphCache(cache.path).label_counts() == {"e": 4, "f": 4, "s": 0, "m": 0}


def test_cif_with_two_data_blocks_reads_both(tmp_path):
    block = """data_{name}
_cell_length_a {a}
_cell_length_b {a}
_cell_length_c {a}
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
{x}1 {x} 0 0 0
{y}1 {y} 0.5 0.5 0.5
"""
    path = tmp_path / "two.cif"
    path.write_text(block.format(name="first", a=4.0, x="Na", y="Cl") + "\n"
                    + block.format(name="second", a=5.0, x="K", y="Br"))
    stats: dict = {}
    assert list(read_ase(path, skip_bad=True, stats=stats)) == []  # a CIF has no energy labels
    assert stats["skipped"] == 2 and stats["reasons"] == {"missing key": 2}  # both blocks read
    with pytest.raises(ValueError, match=r"two.cif: entry 1: no energy label"):
        list(read_ase(path, index="1"))


def test_the_fast_path_envelope_passes_every_bound_and_is_cut_where_it_must_be():
    """check_graph_size skips the full check only inside an envelope whose worst cell passes
    every bound; with a large min_distance the envelope is not safe and the full check runs."""
    from fastchgnet.data.graph import SAFE_DENSITY, SAFE_HEIGHT, _safe_envelope

    assert _safe_envelope(6.0, 3.0, 0.5)
    n = 1000
    assert not graph_size_problems(n, n / SAFE_DENSITY, (SAFE_HEIGHT,) * 3, (True,) * 3)
    assert not _safe_envelope(6.0, 3.0, 2.0)  # 0.5 atoms/Å^3 cannot all be 2 Å apart
