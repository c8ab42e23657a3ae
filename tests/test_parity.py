"""Numerical parity with the reference CHGNet 0.3.0 (chgnet 0.4.2), and batching invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TOL32, TOL64, max_abs, ref64_predict


def test_parity_set_is_varied(parity_structures, parity_ids):
    sizes = [len(s) for s in parity_structures]
    elements = {el.symbol for s in parity_structures for el in s.composition.elements}
    assert len(parity_structures) >= 20
    assert min(sizes) == 1 and max(sizes) == 64
    assert len(elements) >= 30, sorted(elements)
    assert len(set(parity_ids)) == len(parity_ids)
    import fastchgnet

    graphs = fastchgnet.build_graphs(parity_structures)
    assert any(g.n_angles == 0 for g in graphs)
    assert any(g.n_atoms == 1 for g in graphs)


def test_parameter_count(model):
    assert model.n_params == 412_525
    assert sum(p.numel() for p in model.parameters()) == 412_525


def test_parameter_count_matches_reference(model, ref_model):
    assert model.n_params == sum(p.numel() for p in ref_model.parameters())


@pytest.mark.parametrize("key", ["e", "f", "s", "m"])
def test_parity_float32(key, parity_ids, our_predictions, ref_predictions):
    tol = TOL32[key]
    worst = []
    for name, ours, ref in zip(parity_ids, our_predictions, ref_predictions):
        assert np.shape(ours[key]) == np.shape(ref[key]), name
        assert np.isfinite(ours[key]).all(), name
        err = max_abs(ours[key], ref[key])
        if err > tol:
            worst.append((name, err))
    assert not worst, f"max|Δ{key}| above {tol}: {worst}"


def test_parity_shapes_and_units(parity_structures, our_predictions):
    for s, p in zip(parity_structures, our_predictions):
        n = len(s)
        assert np.shape(p["e"]) == ()
        assert p["f"].shape == (n, 3)
        assert p["s"].shape == (3, 3)
        assert p["m"].shape == (n,)
        assert p["site_energies"].shape == (n,)
        assert p["crystal_fea"].shape == (64,)
        assert (p["m"] >= 0).all()


def test_parity_site_energies(parity_ids, our_predictions, ref_predictions):
    bad = []
    for name, ours, ref in zip(parity_ids, our_predictions, ref_predictions):
        err = max_abs(ours["site_energies"], ref["site_energies"])
        # site energies are per atom in eV; they sum to the total energy
        if err > 1e-4:
            bad.append((name, err))
        n = len(ours["site_energies"])
        assert abs(float(ours["site_energies"].sum()) / n - float(ours["e"])) < 1e-4, name
    assert not bad, bad


def test_parity_crystal_fea(parity_ids, our_predictions, ref_predictions):
    bad = []
    for name, ours, ref in zip(parity_ids, our_predictions, ref_predictions):
        a, b = np.asarray(ours["crystal_fea"], float), np.asarray(ref["crystal_fea"], float)
        err = float(np.abs(a - b).max())
        if err > 1e-4 * max(1.0, float(np.abs(b).max())):
            bad.append((name, err))
    assert not bad, bad


@pytest.mark.slow
def test_parity_float64(model64, ref_model64, parity_structures, parity_ids,
                        ill_conditioned_structures):
    """float64 against a float64 run of the reference: equal to rounding, on every structure,
    including ones whose float32 results are dominated by rounding."""
    # a subset keeps the slow float64 reference cheap: small parity structures + ill-conditioned
    import fastchgnet

    graphs = fastchgnet.build_graphs(parity_structures)
    picks = [i for i, g in enumerate(graphs) if g.n_atoms <= 16 and g.n_angles <= 1100]
    structs = [parity_structures[i] for i in picks] + list(ill_conditioned_structures)
    names = [parity_ids[i] for i in picks] + [
        f"ill-{k}-{s.composition.reduced_formula}" for k, s in enumerate(ill_conditioned_structures)]
    assert len(structs) >= 12
    ref = ref64_predict(ref_model64, structs)
    ours = model64.predict(structs, task="efsm", return_site_energies=True,
                           return_crystal_feas=True)
    bad = []
    for name, o, r in zip(names, ours, ref):
        assert o["f"].dtype == np.float64
        for key, tol in TOL64.items():
            err = max_abs(o[key], r[key])
            if err > tol:
                bad.append((name, key, err))
        if max_abs(o["site_energies"], r["site_energies"]) > 1e-7:
            bad.append((name, "site_energies", max_abs(o["site_energies"], r["site_energies"])))
        if max_abs(o["crystal_fea"], r["crystal_fea"]) > 1e-7:
            bad.append((name, "crystal_fea", max_abs(o["crystal_fea"], r["crystal_fea"])))
    assert not bad, bad


# ------------------------------------------------------------------------------------------------
# batching


def test_batched_equals_unbatched(model, parity_structures, parity_ids, our_predictions):
    """One batch of 16 gives the same numbers as one structure at a time."""
    assert len(parity_structures) > 16  # at least two batches
    tol = {"e": 1e-5, "f": 1e-4, "s": 1e-3, "m": 1e-5}
    bad = []
    for name, s, batched in zip(parity_ids, parity_structures, our_predictions):
        single = model.predict(s, task="efsm")
        assert isinstance(single, dict)
        for key, t in tol.items():
            err = max_abs(batched[key], single[key])
            if err > t:
                bad.append((name, key, err))
    assert not bad, bad


def test_batch_bounds_do_not_change_results(model, parity_structures, our_predictions):
    """Splitting by atom / bond / angle budgets gives the same results in the same order."""
    structs = parity_structures[:10]
    for kw in ({"max_atoms": 20}, {"max_bonds": 3000}, {"max_angles": 1500}, {"batch_size": 3}):
        out = model.predict(structs, task="efsm", **kw)
        assert len(out) == len(structs)
        for s, a, b in zip(structs, out, our_predictions[:10]):
            assert a["f"].shape == (len(s), 3)
            assert max_abs(a["e"], b["e"]) <= 1e-5, kw
            assert max_abs(a["f"], b["f"]) <= 1e-4, kw


def test_batched_equals_unbatched_float64(model64, parity_structures):
    structs = [s for s in parity_structures if len(s) <= 12][:8]
    batched = model64.predict(structs, task="efsm", batch_size=16)
    for s, b in zip(structs, batched):
        single = model64.predict(s, task="efsm")
        assert max_abs(b["e"], single["e"]) <= 1e-12
        assert max_abs(b["f"], single["f"]) <= 1e-10
        assert max_abs(b["s"], single["s"]) <= 1e-9
        assert max_abs(b["m"], single["m"]) <= 1e-12


def test_predict_list_vs_single_return_types(model, parity_structures):
    s = parity_structures[0]
    one = model.predict(s)
    lst = model.predict([s])
    assert isinstance(one, dict) and isinstance(lst, list) and len(lst) == 1
    assert model.predict([]) == []
    for key in "efsm":
        assert isinstance(one[key], np.ndarray)
        # float32 CPU gradients accumulate in a thread-dependent order: equal to rounding
        assert max_abs(one[key], lst[0][key]) <= (1e-3 if key == "s" else 1e-5), key


@pytest.mark.parametrize("task, keys", [("e", {"e"}), ("ef", {"e", "f"}), ("em", {"e", "m"}),
                                        ("efs", {"e", "f", "s"})])
def test_tasks_return_requested_keys(model, parity_structures, our_predictions, task, keys):
    out = model.predict(parity_structures[:3], task=task)
    for o, full in zip(out, our_predictions[:3]):
        assert set(o) == keys
        for k in keys:
            tol = 1e-3 if k == "s" else 1e-4 if k == "f" else 1e-5
            assert max_abs(o[k], full[k]) <= tol, k


def test_invalid_task(model, parity_structures):
    with pytest.raises(ValueError, match="task"):
        model.predict(parity_structures[0], task="x")


def test_predict_restores_training_mode_and_grad_mode(small_model, parity_structures):
    small_model.train()
    with torch.no_grad():
        small_model.predict(parity_structures[:2], task="efsm")
    assert small_model.training
    assert torch.is_grad_enabled()
    small_model.predict(parity_structures[:2], task="e")
    assert torch.is_grad_enabled()


def test_predict_accepts_ase_atoms_and_graphs(model64, parity_structures):
    """pymatgen Structure, ASE Atoms and a prebuilt CrystalGraph give the same predictions."""
    from pymatgen.io.ase import AseAtomsAdaptor

    import fastchgnet

    structs = [s for s in parity_structures if len(s) <= 12][:3]
    ref = model64.predict(structs, task="efsm")
    atoms = [AseAtomsAdaptor.get_atoms(s) for s in structs]
    graphs = fastchgnet.build_graphs(structs)
    single_atoms = model64.predict(atoms[0], task="efsm")
    assert isinstance(single_atoms, dict)
    for other in (model64.predict(atoms, task="efsm"), model64.predict(graphs, task="efsm"),
                  model64.predict([atoms[0], graphs[1], structs[2]], task="efsm")):
        for a, b in zip(ref, other):
            for k in "efsm":
                assert max_abs(a[k], b[k]) <= 1e-10, k
    for k in "efsm":
        assert max_abs(single_atoms[k], ref[0][k]) <= 1e-10
