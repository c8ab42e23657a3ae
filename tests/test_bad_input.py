"""Bad structures: clear ValueErrors naming the structure (index, id) and the problem."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from ase import Atoms
from pymatgen.core import Lattice, Structure

import fastchgnet
from fastchgnet.data.prototypes import make
from conftest import max_abs

CELL = np.eye(3) * 4.0


def good(seed: int = 0) -> Structure:
    return make("rocksalt", ["Na", "Cl"], rattle=0.03, seed=seed)


BAD = {
    "empty-pymatgen": (lambda: Structure(Lattice.cubic(4.0), [], []), r"empty"),
    "empty-ase": (lambda: Atoms(cell=CELL, pbc=True), r"empty"),
    "Z=0": (lambda: Atoms(numbers=[11, 0], positions=[[0, 0, 0], [2, 2, 2]], cell=CELL, pbc=True),
            r"atomic number 0"),
    "Z=95-ase": (lambda: Atoms(numbers=[95, 17], positions=[[0, 0, 0], [2, 2, 2]], cell=CELL,
                               pbc=True), r"atomic number 95"),
    "Z=95-pymatgen": (lambda: Structure(Lattice.cubic(4.0), ["Am", "Cl"], [[0, 0, 0], [.5, .5, .5]]),
                      r"atomic number 95"),
    "Z=118": (lambda: Atoms(numbers=[118, 17], positions=[[0, 0, 0], [2, 2, 2]], cell=CELL,
                            pbc=True), r"atomic number 118"),
    "NaN-coordinate": (lambda: Atoms(numbers=[11, 17], positions=[[0, 0, 0], [2, np.nan, 2]],
                                     cell=CELL, pbc=True), r"(?i)nan|non-finite"),
    "inf-coordinate": (lambda: Atoms(numbers=[11, 17], positions=[[np.inf, 0, 0], [2, 2, 2]],
                                     cell=CELL, pbc=True), r"(?i)inf|non-finite"),
    "NaN-coordinate-pymatgen": (lambda: Structure(Lattice.cubic(4.0), ["Na", "Cl"],
                                                  [[0, 0, 0], [0.5, np.nan, 0.5]]),
                                r"(?i)nan|non-finite"),
    "NaN-lattice": (lambda: Atoms(numbers=[11, 17], positions=[[0, 0, 0], [2, 2, 2]],
                                  cell=[[4, 0, 0], [0, np.nan, 0], [0, 0, 4]], pbc=True),
                    r"(?i)lattice"),
    "singular-lattice": (lambda: Atoms(numbers=[11, 17], positions=[[0, 0, 0], [2, 2, 0]],
                                       cell=[[4, 0, 0], [0, 4, 0], [4, 4, 0]], pbc=True),
                         r"(?i)singular|volume"),
    "zero-lattice-vector": (lambda: Atoms(numbers=[11, 17], positions=[[0, 0, 0], [2, 2, 0]],
                                          cell=[[4, 0, 0], [0, 4, 0], [0, 0, 0]], pbc=True),
                            r"(?i)singular|volume"),
    "too-close": (lambda: Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.3, 0, 0]],
                                    coords_are_cartesian=True), r"(?i)apart|distance|close"),
    "same-position": (lambda: Structure(Lattice.cubic(4.0), ["Na", "Cl", "Cl"],
                                        [[0, 0, 0], [2, 2, 2], [2, 2, 2]],
                                        coords_are_cartesian=True), r"(?i)apart|distance|close"),
    "too-close-to-own-image": (lambda: Structure(Lattice.cubic(0.4), ["H"], [[0, 0, 0]]),
                               r"(?i)apart|distance|close"),
    "isolated-atom": (lambda: Structure(Lattice.cubic(15.0), ["Na", "Cl", "K"],
                                        [[0, 0, 0], [2.4, 0, 0], [7.5, 7.5, 7.5]],
                                        coords_are_cartesian=True), r"(?i)isolated"),
}


def names_structure(msg: str, index: int) -> bool:
    return re.search(rf"\bstructure {index}\b", msg) is not None


@pytest.mark.parametrize("case", list(BAD))
def test_build_graph_error_names_structure_and_problem(case):
    make_bad, problem = BAD[case]
    s = make_bad()
    with pytest.raises(ValueError) as info:
        fastchgnet.build_graph(s, index=7, graph_id="mp-xyz")
    msg = str(info.value)
    assert names_structure(msg, 7), msg
    assert "mp-xyz" in msg, msg
    assert re.search(problem, msg), msg


@pytest.mark.parametrize("case", list(BAD))
def test_predict_error_names_index_and_id(model, case):
    make_bad, problem = BAD[case]
    structs = [good(0), good(1), make_bad()]
    with pytest.raises(ValueError) as info:
        model.predict(structs, ids=["a", "b", "the-bad-one"])
    msg = str(info.value)
    assert names_structure(msg, 2), msg
    assert "the-bad-one" in msg, msg
    assert re.search(problem, msg), msg
    assert not names_structure(msg, 0) and not names_structure(msg, 1), msg


def test_single_bad_structure_predict_raises(model):
    with pytest.raises(ValueError, match=r"(?i)empty"):
        model.predict(Atoms(cell=CELL, pbc=True))


def test_two_bad_of_five_reported_together():
    structs = [good(0), BAD["NaN-coordinate"][0](), good(1), BAD["empty-ase"][0](), good(2)]
    ids = ["ok-0", "nan-1", "ok-2", "empty-3", "ok-4"]
    with pytest.raises(ValueError) as info:
        fastchgnet.build_graphs(structs, ids=ids)
    msg = str(info.value)
    for i in (1, 3):
        assert names_structure(msg, i), msg
    for i in (0, 2, 4):
        assert not names_structure(msg, i), msg
    assert "nan-1" in msg and "empty-3" in msg
    assert "ok-0" not in msg and "ok-2" not in msg and "ok-4" not in msg
    assert re.search(r"(?i)nan|non-finite", msg) and re.search(r"(?i)empty", msg)


def test_predict_propagates_combined_error(model):
    structs = [good(0), BAD["Z=0"][0](), good(1), BAD["too-close"][0](), good(2)]
    with pytest.raises(ValueError) as info:
        model.predict(structs, ids=[f"id{i}" for i in range(5)])
    msg = str(info.value)
    assert names_structure(msg, 1) and names_structure(msg, 3), msg
    assert "id1" in msg and "id3" in msg
    assert not any(names_structure(msg, i) for i in (0, 2, 4)), msg
    # without ids the index alone identifies the structure
    with pytest.raises(ValueError) as info:
        model.predict(structs)
    msg = str(info.value)
    assert names_structure(msg, 1) and names_structure(msg, 3), msg


def test_disordered_structure_rejected():
    s = Structure(Lattice.cubic(4.0), [{"Na": 0.5, "K": 0.5}, "Cl"], [[0, 0, 0], [.5, .5, .5]])
    with pytest.raises(ValueError, match=r"(?i)disorder"):
        fastchgnet.build_graph(s, index=0)


def test_wrong_type_rejected():
    with pytest.raises(TypeError):
        fastchgnet.build_graph("not a structure")


def test_min_distance_is_configurable():
    s = BAD["too-close"][0]()
    g = fastchgnet.build_graph(s, min_distance=0.1)
    assert g.bond_length.min() == pytest.approx(0.3)


# ------------------------------------------------------------------------------------------------
# isolated atoms


def isolated_structure() -> Structure:
    return BAD["isolated-atom"][0]()


def test_isolated_error_is_default(model):
    with pytest.raises(ValueError, match=r"(?i)isolated"):
        model.predict(isolated_structure())
    with pytest.raises(ValueError, match=r"(?i)isolated"):
        fastchgnet.build_graph(isolated_structure(), on_isolated_atoms="error")


def test_isolated_warn_predicts(model):
    s = isolated_structure()
    with pytest.warns(UserWarning, match=r"(?i)isolated"):
        p = model.predict(s, on_isolated_atoms="warn")
    assert np.isfinite(p["e"]) and np.isfinite(p["f"]).all() and np.isfinite(p["s"]).all()
    assert p["f"].shape == (3, 3)
    # the isolated atom feels no force
    np.testing.assert_array_equal(p["f"][2], 0.0)
    with pytest.warns(UserWarning, match=r"(?i)isolated"):
        fastchgnet.build_graph(s, on_isolated_atoms="warn")


def test_isolated_ignore_is_silent(model):
    s = isolated_structure()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = model.predict([s, good(3)], on_isolated_atoms="ignore")
        g = fastchgnet.build_graph(s, on_isolated_atoms="ignore")
    assert g.n_atoms == 3
    assert np.isfinite(p[0]["e"]) and np.isfinite(p[1]["e"])
    # the good structure is unaffected by its isolated neighbour in the batch
    alone = model.predict(good(3))
    assert max_abs(p[1]["e"], alone["e"]) <= 1e-5
    assert max_abs(p[1]["f"], alone["f"]) <= 1e-4


def test_all_atoms_isolated_ignore(model):
    s = Structure(Lattice.cubic(15.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    p = model.predict(s, on_isolated_atoms="ignore")
    assert np.isfinite(p["e"])
    np.testing.assert_array_equal(p["f"], 0.0)
    np.testing.assert_array_equal(p["s"], 0.0)


def test_isolated_atoms_match_reference(model, ref_model):
    """With isolated atoms ignored, the energy of an isolated atom comes from its embedding alone,
    as in the reference."""
    structs = [isolated_structure(),
               Structure(Lattice.cubic(15.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])]
    conv = ref_model.graph_converter
    saved = conv.on_isolated_atoms
    conv.on_isolated_atoms = "ignore"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = ref_model.predict_structure(structs, task="efsm")
    finally:
        conv.on_isolated_atoms = saved
    ours = model.predict(structs, task="efsm", on_isolated_atoms="ignore")
    for o, r in zip(ours, ref):
        assert max_abs(o["e"], r["e"]) <= 2e-5
        assert max_abs(o["f"], r["f"]) <= 2e-4
        assert max_abs(o["s"], r["s"]) <= 2e-3
        assert max_abs(o["m"], r["m"]) <= 2e-4


def test_invalid_on_isolated_value():
    with pytest.raises(ValueError, match="on_isolated_atoms"):
        fastchgnet.build_graph(isolated_structure(), on_isolated_atoms="explode")
