"""Oxidation states from magnetic moments (fastchgnet.properties.charges) against chgnet's
``solve_charge_by_mag``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

import fastchgnet
from fastchgnet.properties.charges import charges_from_magmoms, oxidation_states

# a rule for Co that separates the CIF's Co3+ and Co4+ sites by CHGNet 0.3.0's moments
# (Co3+: 0.38-0.57 μB, Co4+: 0.60 μB)
CO_RANGES = {"Co": {(0.0, 0.58): 3, (0.58, 5.0): 4}}


def _reference(structure, magmoms, **kw):
    vasp_utils = pytest.importorskip("chgnet.utils.vasp_utils")
    s = structure.copy()
    s.add_site_property("magmom", list(magmoms))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vasp_utils.solve_charge_by_mag(s, **kw)


def _states(s):
    return [sp.oxi_state for sp in s.species]


@pytest.mark.parametrize("name, kw", [("LiMnO2", {}), ("Li9Co7O16", {"ox_ranges": CO_RANGES})])
def test_cifs_match_chgnet(model, cif_structures, name, kw):
    s = cif_structures[name]
    m = fastchgnet.predict(model, s, task="em")["m"]
    ref = _reference(s, m, **kw)
    assert ref is not None
    ours = charges_from_magmoms(s, m, **kw)
    assert _states(ours) == _states(ref)
    assert ours.species == ref.species
    # the CIF's own labels (Mn3+; five Co3+ and two Co4+)
    assert _states(ours) == [sp.oxi_state for sp in s.species]
    # moments predicted here when none are given (same model)
    auto = charges_from_magmoms(s, model=model, **kw)
    assert _states(auto) == _states(ref)


def test_unsolved_is_none_as_in_chgnet(model, cif_structures):
    s = cif_structures["Li9Co7O16"]  # no default rule for Co
    m = fastchgnet.predict(model, s, task="em")["m"]
    assert _reference(s, m) is None
    with pytest.warns(UserWarning, match="Failed to solve oxidation state"):
        assert charges_from_magmoms(s, m) is None
    ox = oxidation_states(s, m)
    assert np.isnan(ox[9:16]).all() and not np.isnan(np.delete(ox, range(9, 16))).any()


def test_hand_made_ranges_and_site_properties():
    s = Structure(Lattice.cubic(4.0), ["Mn", "Mn", "Mn", "Mn", "Mn", "O", "Li", "Mn"],
                  [[0, 0, 0], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5], [0.5, 0.5, 0],
                   [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], [0.75, 0.75, 0.75]])
    # every Mn range, its boundaries (low inclusive, high exclusive) and the rule's order
    m = [0.5, 1.5, 2.5, 3.5, 4.2, 0.0, 0.0, 4.199]
    expect = [2, 3, 4, 3, 2, -2, 1, 3]
    ref = _reference(s, m)
    assert _states(ref) == expect
    s.add_site_property("final_magmom", m)
    s.add_site_property("magmom", [9.0] * len(s))  # final_magmom wins, as in chgnet
    assert _states(charges_from_magmoms(s)) == expect
    # vector moments: their norms
    vec = np.zeros((len(s), 3))
    vec[:, 2] = m
    np.testing.assert_array_equal(oxidation_states(s, vec), expect)
    # a moment outside every range leaves the site unsolved
    with pytest.warns(UserWarning, match="site 0"):
        assert charges_from_magmoms(s, [5.0] + m[1:]) is None
    # user tables
    ox = oxidation_states(s, m, default_ox={"O": -1, "Li": 1},
                          ox_ranges={"Mn": {(0.0, 2.0): 7, (0.0, 9.0): 5}})
    np.testing.assert_array_equal(ox, [7, 7, 5, 5, 5, -1, 1, 5])
    with pytest.raises(ValueError, match="one value per site"):
        oxidation_states(s, m[:3])
