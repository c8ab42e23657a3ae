"""The benchmark port of chgnet's 0.3.0 weights to matgl's CHGNet (fastchgnet.bench.peers).

matgl's CHGNet differs from chgnet's architecture in two places (its smooth cutoff is the
envelope of the radial basis *values*; its bond features are per directed bond). With those two
replaced by chgnet's for the check (``chgnet_cutoff``, ``chgnet_bonds``), the ported model must
reproduce chgnet 0.3.0 within the float32 parity tolerances: that proves the weight mapping, so
that the peers' speed comparison runs the 0.3.0 network in matgl's own architecture.
"""

from __future__ import annotations

import warnings

import pytest

from fastchgnet.bench.peers import PEERS_HINT, matgl_available

if not matgl_available():
    pytest.skip(PEERS_HINT, allow_module_level=True)
pytest.importorskip("chgnet", reason="chgnet (the weights' source and the reference) is not installed")

TOL32 = {"e": 2e-5, "f": 2e-4, "s": 2e-3, "m": 2e-4}  # as tests/conftest.py


@pytest.fixture(scope="module")
def setup():
    from fastchgnet.bench.common import load_reference
    from fastchgnet.bench.peers import matgl_potential
    from fastchgnet.data.prototypes import make

    ref = load_reference("cpu")
    pot = matgl_potential(ref)  # asserts: every matgl parameter assigned once, every chgnet one used
    s = make("rocksalt", ["Mn", "O"], rattle=0.04, seed=7)  # 8 atoms, with angles (Mn-O 2.2 Å)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ref.predict_structure([s, s], task="efsm", batch_size=2)[:1]
    return pot, s, want


def test_port_reproduces_chgnet_030_with_chgnet_cutoff_and_bonds(setup):
    from fastchgnet.bench.peers import chgnet_bonds, chgnet_cutoff, matgl_outputs, max_diffs

    pot, s, want = setup
    with chgnet_cutoff(pot.model), chgnet_bonds(pot.model):
        diffs = max_diffs(matgl_outputs(pot, [s]), want)
    assert all(diffs[k] <= TOL32[k] for k in TOL32), diffs


def test_matgl_architecture_itself_differs_from_chgnet(setup):
    """Unpatched (as timed), matgl's CHGNet with the 0.3.0 weights is a different function."""
    from fastchgnet.bench.peers import matgl_outputs, max_diffs

    pot, s, want = setup
    diffs = max_diffs(matgl_outputs(pot, [s]), want)
    assert diffs["e"] > 100 * TOL32["e"] and diffs["f"] > 100 * TOL32["f"], diffs
