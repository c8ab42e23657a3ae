"""The decoupled interaction block (FastCHGNet Eq. 11)."""

from __future__ import annotations

import pytest
import torch

import fastchgnet
from conftest import perturb_norms, transformed_copies
from fastchgnet.data import build_graphs, collate
from fastchgnet.data.prototypes import random_structures
from fastchgnet.model import CHGNet, DecoupledCHGNet
from fastchgnet.model.weights import MODEL_TYPES, save_checkpoint

SMALL = dict(atom_fea_dim=16, bond_fea_dim=16, angle_fea_dim=16, num_radial=7, num_angular=7,
             atom_conv_hidden_dim=16, bond_conv_hidden_dim=16, mlp_hidden_dims=(16,), n_conv=3)


def _batch(n=4, seed=1, dtype=torch.float64):
    return collate(build_graphs(random_structures(n, seed=seed, max_atoms=10)), dtype=dtype)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return perturb_norms(DecoupledCHGNet(**{**SMALL, **kw}).double()).eval()


class Unpacked(CHGNet):
    """The decoupled block written plainly (no packing): each update calls its own module."""

    def interaction(self, i, atom, bond, angle, bw_ag, bw_bg, src_dir, dst_dir, center, b1, b2,
                    update_angle=True, rows=None):
        c = self.config
        new_atom = self.atom_convs[i](atom, bond, bw_ag, src_dir, dst_dir)
        new_bond = (self.bond_convs[i](atom, bond, bw_bg, angle, center, b1, b2, rows)
                    if c.update_bond else bond)
        if c.update_angle and update_angle:
            angle = self.angle_updates[i](atom, bond, angle, center, b1, b2, rows)
        return new_atom, new_bond, angle


def test_packed_block_equals_the_plain_decoupled_equations():
    m = _model()
    ref = Unpacked(m.config).double()
    ref.load_state_dict(m.state_dict())
    batch = _batch()
    a, b = m(batch, task="efsm"), ref.eval()(batch, task="efsm")
    for k in "efsm":
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-10)


def test_decoupled_differs_from_exact_with_the_same_weights():
    m = _model()
    ex = CHGNet(m.config).double().eval()
    ex.load_state_dict(m.state_dict())
    batch = _batch()
    assert not torch.allclose(m(batch, task="e")["e"], ex(batch, task="e")["e"])


def test_forces_and_stress_are_energy_derivatives():
    m = _model()
    s = random_structures(1, seed=7, max_atoms=6)[0]
    batch = collate(build_graphs([s]), dtype=torch.float64)
    out = m(batch, task="efs")
    n = len(s)
    h = 1e-5
    for atom in range(min(n, 2)):
        for d in range(3):
            def e_at(delta):
                b = collate(build_graphs([s]), dtype=torch.float64)
                b.positions[atom, d] += delta
                return float(m(b, task="e")["e"][0].detach()) * n
            fd = -(e_at(h) - e_at(-h)) / (2 * h)
            assert abs(fd - float(out["f"][atom, d])) < 1e-6
    # stress symmetric
    torch.testing.assert_close(out["s"][0], out["s"][0].T, rtol=1e-8, atol=1e-8)


def test_rotation_translation_and_permutation_symmetry():
    m = _model()
    s = random_structures(1, seed=3, max_atoms=8)[0]
    rot, R, moved, ps, perm = transformed_copies(s)
    o, r, p, t = (m(collate(build_graphs([x]), dtype=torch.float64), task="efsm")
                  for x in (s, rot, ps, moved))
    torch.testing.assert_close(r["e"], o["e"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(r["f"], o["f"] @ R.T, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(r["s"][0], R @ o["s"][0] @ R.T, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(t["e"], o["e"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(t["f"], o["f"], rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(p["e"], o["e"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(p["f"], o["f"][perm], rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(p["m"], o["m"][perm], rtol=1e-7, atol=1e-7)


def test_batched_equals_unbatched():
    m = _model()
    structs = random_structures(3, seed=9, max_atoms=8)
    full = m(collate(build_graphs(structs), dtype=torch.float64), task="efsm")
    start = 0
    for i, s in enumerate(structs):
        one = m(collate(build_graphs([s]), dtype=torch.float64), task="efsm")
        torch.testing.assert_close(one["e"][0], full["e"][i], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(one["f"], full["f"][start:start + len(s)], rtol=1e-8, atol=1e-8)
        start += len(s)


def test_trains_with_second_order_gradients():
    m = _model().train()
    batch = _batch()
    out = m(batch, task="efsm")
    loss = out["e"].square().mean() + out["f"].square().mean() + out["s"].square().mean()
    loss.backward()
    used = [n for n, p in m.named_parameters() if p.grad is not None]
    assert "atom_convs.0.w_atom" in used and "angle_updates.0.w_bond" in used


def test_starts_from_exact_weights_and_round_trips_checkpoints(tmp_path):
    assert MODEL_TYPES["decoupled"] is DecoupledCHGNet
    m = _model()
    path = save_checkpoint(m, tmp_path / "d.pt")
    back = fastchgnet.load_model(path, dtype=torch.float64)
    assert isinstance(back, DecoupledCHGNet)
    batch = _batch()
    torch.testing.assert_close(back(batch, task="e")["e"], m(batch, task="e")["e"])


@pytest.mark.parametrize("flags", [dict(update_angle=False), dict(update_bond=False)])
def test_configs_without_bond_or_angle_updates(flags):
    m = _model(**flags)
    ref = Unpacked(m.config).double().eval()
    ref.load_state_dict(m.state_dict())
    batch = _batch()
    torch.testing.assert_close(m(batch, task="ef")["f"], ref(batch, task="ef")["f"])
