"""The heads model: direct Force and Stress heads on the decoupled backbone (FastCHGNet Eq. 7, 9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

import fastchgnet
from conftest import perturb_norms, transformed_copies
from fastchgnet.data import build_graphs, collate
from fastchgnet.data.prototypes import random_structures
from fastchgnet.model import CHGNet, DecoupledCHGNet, HeadsCHGNet
from fastchgnet.model.weights import MODEL_TYPES, save_checkpoint

SMALL = dict(atom_fea_dim=16, bond_fea_dim=16, angle_fea_dim=16, num_radial=7, num_angular=7,
             atom_conv_hidden_dim=16, bond_conv_hidden_dim=16, mlp_hidden_dims=(16,), n_conv=3,
             head_hidden_dim=16)
HEADS = ["lattice", "virial"]
FORCE_HEADS = ["direct", "pair", "pair+direct"]


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return perturb_norms(HeadsCHGNet(**{**SMALL, **kw}).double()).eval()


def _run(m, structures, task="efsm"):
    return m(collate(build_graphs(list(structures)), dtype=torch.float64), task=task)


def test_registered_and_round_trips_checkpoints(tmp_path):
    assert MODEL_TYPES["heads"] is HeadsCHGNet
    m = _model(stress_head="virial")
    back = fastchgnet.load_model(save_checkpoint(m, tmp_path / "h.pt"), dtype=torch.float64)
    assert isinstance(back, HeadsCHGNet) and back.config.stress_head == "virial"
    s = random_structures(2, seed=4, max_atoms=8)
    a, b = _run(m, s), _run(back, s)
    for k in "efsm":
        torch.testing.assert_close(a[k], b[k])


def test_state_dict_keys_and_parameter_order_are_those_of_earlier_checkpoints():
    """The output stage's modules are registered on the model under their own names, after the
    backbone's: checkpoints and optimizer states (indexed by parameter order) of
    earlier versions still load."""
    m = _model(force_head="pair+direct")
    names = [n for n, _ in m.named_parameters()]
    heads = [n.split(".")[0] for n in names if n.split(".")[0] in ("force_head", "pair_energy", "stress_head")]
    assert names[0] == "atom_ref"  # the root's own parameter comes first, then the submodules
    assert names[len(names) - len(heads):] == [n for n in names if n.split(".")[0] in
                                                 ("force_head", "pair_energy", "stress_head")]
    assert list(dict.fromkeys(heads)) == ["force_head", "pair_energy", "stress_head"]
    assert not any(k.startswith("output.") for k in m.state_dict())


def test_energy_and_magmoms_are_the_decoupled_backbone():
    m = _model()
    dec = DecoupledCHGNet(m.config).double().eval()
    missing = dec.load_state_dict(m.state_dict(), strict=False)
    assert all(k.split(".")[0] in ("force_head", "stress_head") for k in missing.unexpected_keys)
    s = random_structures(3, seed=2, max_atoms=8)
    a, b = _run(m, s), _run(dec, s, task="em")
    torch.testing.assert_close(a["e"], b["e"])
    torch.testing.assert_close(a["m"], b["m"])


def test_starts_from_exact_weights_only_heads_are_new():
    ex = CHGNet(**SMALL)
    m = HeadsCHGNet(ex.config)
    res = m.load_state_dict(ex.state_dict(), strict=False)
    assert not res.unexpected_keys
    assert res.missing_keys and all(k.startswith(("force_head.", "stress_head.")) for k in res.missing_keys)


@pytest.mark.parametrize("force", ["direct", "pair+direct"])
def test_no_second_order_derivatives(monkeypatch, force):
    """Neither the forward nor the training backward takes a gradient of the energy."""
    m = _model(force_head=force).train()

    def forbidden(*a, **k):
        raise AssertionError("torch.autograd.grad called by the heads model")

    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    batch = collate(build_graphs(random_structures(3, seed=5, max_atoms=8)), dtype=torch.float64)
    out = m(batch, task="efsm", create_graph=True)
    assert not batch.positions.requires_grad
    loss = out["e"].square().mean() + out["f"].square().mean() + out["s"].square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    names = ["force_head.pair.w_atom", "stress_head.pair.w_bond", "atom_convs.0.w_atom",
             "angle_updates.0.w_bond"] + (["pair_energy.pair.w_atom"] if force != "direct" else [])
    for name in names:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    with torch.no_grad():  # inference of every output without autograd
        assert m.eval()(batch, task="efsm")["f"].shape == batch.positions.shape


@pytest.mark.parametrize("head, force", [("lattice", "direct"), ("virial", "direct"), ("virial", "pair"),
                                         ("lattice", "pair+direct")])
def test_rotation_translation_permutation_and_symmetric_stress(head, force):
    m = _model(stress_head=head, force_head=force)
    s = random_structures(1, seed=3, max_atoms=8)[0]
    rot, R, moved, ps, perm = transformed_copies(s)
    o, r, t, p = (_run(m, [x]) for x in (s, rot, moved, ps))
    assert o["f"].abs().max() > 1e-4 and o["s"].abs().max() > 1e-4  # non-trivial outputs
    torch.testing.assert_close(r["e"], o["e"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(r["f"], o["f"] @ R.T, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(r["s"][0], R @ o["s"][0] @ R.T, rtol=1e-7, atol=1e-9)
    for x in (t, p):
        torch.testing.assert_close(x["e"], o["e"], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(x["s"], o["s"], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(t["f"], o["f"], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(p["f"], o["f"][perm], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(o["s"][0], o["s"][0].T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("head, force", [("lattice", "direct"), ("virial", "direct"),
                                         ("virial", "pair+direct")])
def test_batched_equals_unbatched(head, force):
    m = _model(stress_head=head, force_head=force)
    structs = random_structures(3, seed=9, max_atoms=8)
    full = _run(m, structs)
    start = 0
    for i, s in enumerate(structs):
        one = _run(m, [s])
        for k in "es":
            torch.testing.assert_close(one[k][0], full[k][i], rtol=1e-10, atol=1e-10)
        for k in "fm":
            torch.testing.assert_close(one[k], full[k][start:start + len(s)], rtol=1e-9, atol=1e-10)
        start += len(s)


def test_net_force_removal():
    structs = random_structures(3, seed=11, max_atoms=8)
    batch = collate(build_graphs(structs), dtype=torch.float64)

    def net(m):
        f = m(batch, task="ef")["f"]
        return torch.zeros(3, 3, dtype=f.dtype).index_add(0, batch.atom_graph, f)

    on = _model(remove_net_force=True)
    off = _model(remove_net_force=False)
    assert net(off).abs().max() > 1e-4  # direct forces need not sum to zero ...
    torch.testing.assert_close(net(on), torch.zeros(3, 3, dtype=torch.float64), rtol=0, atol=1e-12)
    f_on, f_off = on(batch, task="ef")["f"], off(batch, task="ef")["f"]
    mean = net(off) / batch.n_atoms.double()[:, None]
    torch.testing.assert_close(f_on, f_off - mean[batch.atom_graph])  # ... the mean is removed


def test_virial_stress_does_not_depend_on_the_choice_of_cell():
    """Same crystal, another primitive basis (a1 + a2, a2, a3): same stress and forces."""
    s = random_structures(1, seed=5, max_atoms=6)[0]
    t = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]])
    other = Structure(Lattice(t @ s.lattice.matrix), s.species, s.cart_coords, coords_are_cartesian=True)
    m = _model(stress_head="virial")
    a, b = _run(m, [s]), _run(m, [other])
    torch.testing.assert_close(a["s"], b["s"], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(a["f"], b["f"], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("force", ["direct", "pair"])
def test_forces_vanish_smoothly_at_the_cutoff(force):
    """A neighbour leaving the 6 Å sphere changes the forces continuously (envelope)."""
    m = _model(remove_net_force=False, force_head=force)

    def force(d):
        lat = Lattice.cubic(20.0)  # isolated: only the pair and the third atom
        s = Structure(lat, ["Si", "Si", "O"], [[0, 0, 0], [2.3, 0, 0], [2.3 - d, 0.0, 0.0]],
                      coords_are_cartesian=True)
        return _run(m, [s], task="ef")["f"]

    # across the cutoff the force changes as smoothly as inside: the second difference is tiny
    # (a neighbour dropped without the envelope would jump by the size of its pair term)
    deeper, inside, outside = force(6.0 - 3e-4), force(6.0 - 1e-4), force(6.0 + 1e-4)
    assert (outside - 2 * inside + deeper).abs().max() < 1e-6


def test_pair_head_forces_and_virial_are_derivatives_of_its_energy():
    """``force_head="pair"``: the forces are -d/dx and the stress the virial of the pair energy
    with its coefficients held fixed; the pair energy is part of the energy (and of the site
    energies)."""
    from fastchgnet.model.outputs import cell_volume
    from fastchgnet.units import EV_A3_TO_GPA

    m = _model(force_head="pair", remove_net_force=False)
    batch = collate(build_graphs(random_structures(2, seed=6, max_atoms=8)), dtype=torch.float64)
    out = m(batch, task="efs", return_site_energies=True)
    with torch.no_grad():
        feats = m.features(batch, m.bond_vectors(batch))
    vec = m.bond_vectors(batch).requires_grad_(True)
    phi, _ = m.pair_energy(feats.atom, feats.bond, torch.linalg.vector_norm(vec, dim=1), batch)
    (grad,) = torch.autograd.grad(phi.sum(), vec)
    f = torch.zeros_like(batch.positions).index_add(0, batch.bond_src, -grad).index_add(0, batch.bond_dst, grad)
    assert f.abs().max() > 1e-3
    torch.testing.assert_close(out["f"], f, rtol=1e-9, atol=1e-12)
    vir = torch.zeros(2, 3, 3, dtype=torch.float64).index_add(
        0, batch.bond_graph, vec.detach().unsqueeze(2) * grad.unsqueeze(1))
    unit = vec.detach() / feats.length[:, None]
    env = fastchgnet.nn.functional.envelope(feats.length / 6.0, m.config.cutoff_coeff)
    learnt = m.stress_head(feats.atom, batch, bond=feats.bond, unit=unit, length=feats.length,
                           env=env)
    torch.testing.assert_close(out["s"] - learnt, vir * (EV_A3_TO_GPA / cell_volume(batch.lattice))[:, None, None],
                               rtol=1e-9, atol=1e-12)
    n = batch.n_atoms.double()
    backbone = feats.energy + torch.zeros(2, dtype=torch.float64).index_add(0, batch.bond_graph, phi.detach())
    ref = m.atom_ref.index_select(0, batch.atomic_numbers - 1)
    comp = torch.zeros(2, dtype=torch.float64).index_add(0, batch.atom_graph, ref)
    torch.testing.assert_close(out["e"], (backbone + comp) / n, rtol=1e-10, atol=1e-12)
    site = torch.zeros(2, dtype=torch.float64).index_add(0, batch.atom_graph, out["site_energies"])
    torch.testing.assert_close(site, out["e"] * n, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bad", [dict(stress_head="sum"), dict(head_hidden_dim=0), dict(force_head="sum"),
                                 dict(pair_energy_basis=0)])
def test_bad_head_options_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        HeadsCHGNet(**{**SMALL, **bad})


def test_heads_end_to_end_train_predict_evaluate_md(tmp_path):
    """``--model heads`` through the whole tool chain: train, predict, evaluate, ASE calculator
    (relax) and MD, all from the trained checkpoint."""
    from fastchgnet.cli import main
    from fastchgnet.md import CHGNetCalculator

    out, cache = tmp_path / "run", str(tmp_path / "cache")
    # the pair-energy force head: its energy term goes through every tool as well
    assert main(["train", "--model", "heads", "--force-head", "pair+direct", "--limit", "20", "--epochs", "1",
                 "--batch-size", "8", "--out", str(out), "--cache", cache, "--device", "cpu",
                 "--no-progress", "--no-plots"]) == 0
    assert main(["train", "--model", "exact", "--force-head", "pair", "--out", str(tmp_path / "x")]) == 1
    ckpt = out / "best.pt"
    model = fastchgnet.load_model(ckpt)
    assert isinstance(model, HeadsCHGNet) and model.config.force_head == "pair+direct"
    s = random_structures(1, seed=8, max_atoms=6)[0]
    cif = tmp_path / "s.cif"
    s.to(filename=str(cif))
    assert main(["predict", "--model", str(ckpt), "--device", "cpu", str(cif)]) == 0
    assert main(["evaluate", str(ckpt), "--limit", "8", "--cache", cache, "--device", "cpu",
                 "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "eval.json").is_file()
    atoms = s.to_ase_atoms() if hasattr(s, "to_ase_atoms") else __import__(
        "pymatgen.io.ase", fromlist=["AseAtomsAdaptor"]).AseAtomsAdaptor.get_atoms(s)
    atoms.calc = CHGNetCalculator(model=str(ckpt), device="cpu")
    f = atoms.get_forces()
    np.testing.assert_allclose(f, fastchgnet.predict(model, s)["f"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(atoms.get_potential_energy() / len(s), fastchgnet.predict(model, s)["e"],
                               rtol=1e-5, atol=1e-5)
    assert atoms.get_stress().shape == (6,)
    assert main(["md", str(cif), "--model", str(ckpt), "--device", "cpu", "--ensemble", "nve",
                 "--steps", "4", "--loginterval", "2", "--out", str(tmp_path / "md")]) == 0
    assert (tmp_path / "md" / f"{cif.stem}.log").is_file()  # outputs named after the input
