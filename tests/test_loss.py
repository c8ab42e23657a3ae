"""Training loss, metrics, optimizer and learning-rate schedule (fastchgnet.train)."""

from __future__ import annotations

import ast
import contextlib
import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import fastchgnet
from fastchgnet.data.prototypes import make
from fastchgnet.train import (
    EFSMLoss,
    MAEAccumulator,
    Targets,
    collate_targets,
    default_lr,
    make_optimizer,
    make_scheduler,
)
import fastchgnet.train.loss as loss_mod

# ------------------------------------------------------------------------------------------------
# helpers


def huber(x: float, delta: float) -> float:
    a = abs(x)
    return 0.5 * a * a if a < delta else delta * (a - 0.5 * delta)


def toy(B=2, n=(2, 3), seed=0, dtype=torch.float64):
    """Predictions and full targets for a fake batch: structure i has n[i] atoms."""
    g = torch.Generator().manual_seed(seed)
    N = sum(n)
    atom_graph = torch.repeat_interleave(torch.arange(B), torch.tensor(n))
    pred = {"e": torch.randn(B, generator=g, dtype=dtype),
            "f": torch.randn(N, 3, generator=g, dtype=dtype),
            "s": torch.randn(B, 3, 3, generator=g, dtype=dtype),
            "m": torch.rand(N, generator=g, dtype=dtype)}
    tgt = Targets(e=torch.randn(B, generator=g, dtype=dtype),
                  f=torch.randn(N, 3, generator=g, dtype=dtype),
                  s=torch.randn(B, 3, 3, generator=g, dtype=dtype),
                  m=torch.rand(N, generator=g, dtype=dtype),
                  e_mask=torch.ones(B, dtype=torch.bool), f_mask=torch.ones(B, dtype=torch.bool),
                  s_mask=torch.ones(B, dtype=torch.bool), m_mask=torch.ones(N, dtype=torch.bool),
                  atom_graph=atom_graph)
    return pred, tgt


def hand_mean(p, y, keep, delta):
    p, y = p.reshape(p.shape[0], -1), y.reshape(y.shape[0], -1)
    vals = [huber(float(a - b), delta) for i in range(p.shape[0]) if keep[i]
            for a, b in zip(p[i].tolist(), y[i].tolist())]
    return sum(vals) / len(vals) if vals else 0.0


@contextlib.contextmanager
def forbid_host_sync():
    names = ["item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
             "nonzero"]
    saved = {nm: getattr(torch.Tensor, nm) for nm in names}

    def trap(nm):
        def f(self, *a, **k):
            raise AssertionError(f"host sync: Tensor.{nm}")
        return f

    try:
        for nm in names:
            setattr(torch.Tensor, nm, trap(nm))
        yield
    finally:
        for nm, v in saved.items():
            setattr(torch.Tensor, nm, v)


# ------------------------------------------------------------------------------------------------
# loss values


def test_huber_against_hand_computation():
    # errors below and above delta = 0.1
    pred = {"e": torch.tensor([0.05, 0.0, -1.0], dtype=torch.float64)}
    tgt = Targets(e=torch.tensor([0.0, 0.3, -1.02], dtype=torch.float64))
    total, parts = EFSMLoss()(pred, tgt)
    expected = (0.5 * 0.05**2 + 0.1 * (0.3 - 0.05) + 0.5 * 0.02**2) / 3
    assert parts["e"].item() == pytest.approx(expected, rel=1e-12)
    assert total.item() == pytest.approx(2.0 * expected, rel=1e-12)
    assert set(parts) == {"e"}


@pytest.mark.parametrize("delta", [0.1, 0.5])
def test_all_targets_against_hand_computation(delta):
    pred, tgt = toy()
    total, parts = EFSMLoss(delta=delta)(pred, tgt)
    ones_b, ones_n = [True] * 2, [True] * 5
    exp = {"e": hand_mean(pred["e"][:, None], tgt.e[:, None], ones_b, delta),
           "f": hand_mean(pred["f"], tgt.f, ones_n, delta),
           "s": hand_mean(pred["s"], tgt.s, ones_b, delta),
           "m": hand_mean(pred["m"][:, None], tgt.m[:, None], ones_n, delta)}
    for k in "efsm":
        assert parts[k].item() == pytest.approx(exp[k], rel=1e-10), k
    w = {"e": 2.0, "f": 1.5, "s": 0.1, "m": 0.1}
    assert total.item() == pytest.approx(sum(w[k] * exp[k] for k in "efsm"), rel=1e-10)


def test_prefactors_and_loss_kinds():
    pred, tgt = toy()
    _, base = EFSMLoss()(pred, tgt)
    total, parts = EFSMLoss(e=1.0, f=0.0, s=3.0, m=0.5)(pred, tgt)
    assert total.item() == pytest.approx(
        base["e"].item() + 3.0 * base["s"].item() + 0.5 * base["m"].item(), rel=1e-12)
    for k in "efsm":  # the parts are unweighted
        assert parts[k].item() == pytest.approx(base[k].item(), rel=1e-12)
    _, mse = EFSMLoss(loss="mse")(pred, tgt)
    _, mae = EFSMLoss(loss="mae")(pred, tgt)
    assert mse["f"].item() == pytest.approx(((pred["f"] - tgt.f) ** 2).mean().item(), rel=1e-12)
    assert mae["s"].item() == pytest.approx((pred["s"] - tgt.s).abs().mean().item(), rel=1e-12)
    with pytest.raises(ValueError):
        EFSMLoss(loss="l3")
    with pytest.raises(ValueError):
        EFSMLoss(delta=0.0)


def test_missing_prediction_keys_are_skipped():
    pred, tgt = toy()
    ef = {k: pred[k] for k in "ef"}
    total, parts = EFSMLoss()(ef, tgt)
    assert set(parts) == {"e", "f"}
    assert total.item() == pytest.approx(2.0 * parts["e"].item() + 1.5 * parts["f"].item())


# ------------------------------------------------------------------------------------------------
# masks


def test_masked_wrong_label_does_not_change_loss():
    pred, tgt = toy()
    tgt.e_mask = torch.tensor([True, False])
    tgt.f_mask = torch.tensor([False, True])
    tgt.s_mask = torch.tensor([True, False])
    tgt.m_mask = torch.tensor([True, False, True, True, False])
    loss = EFSMLoss()
    total, parts = loss(pred, tgt)
    bad = copy.copy(tgt)
    bad.e, bad.f, bad.s, bad.m = tgt.e.clone(), tgt.f.clone(), tgt.s.clone(), tgt.m.clone()
    bad.e[1] = 1e6
    bad.f[:2] = float("nan")  # the atoms of structure 0
    bad.s[1] = -1e6
    bad.m[1], bad.m[4] = float("inf"), 1e3
    total2, parts2 = loss(pred, bad)
    assert total2.item() == total.item()
    for k in "efsm":
        assert parts2[k].item() == parts[k].item()
    # and the values equal means over the valid elements only
    d = 0.1
    assert parts["e"].item() == pytest.approx(hand_mean(pred["e"][:, None], tgt.e[:, None],
                                                        [True, False], d), rel=1e-12)
    assert parts["f"].item() == pytest.approx(hand_mean(pred["f"], tgt.f,
                                                        [False, False, True, True, True], d),
                                              rel=1e-12)
    assert parts["m"].item() == pytest.approx(
        hand_mean(pred["m"][:, None], tgt.m[:, None], tgt.m_mask.tolist(), d), rel=1e-12)


def test_all_masked_target_is_exactly_zero_with_finite_grads():
    pred, tgt = toy()
    pred = {k: v.clone().requires_grad_(True) for k, v in pred.items()}
    tgt.s_mask = torch.zeros(2, dtype=torch.bool)
    tgt.s = torch.full_like(tgt.s, float("nan"))  # garbage behind a full mask
    tgt.m_mask = torch.zeros(5, dtype=torch.bool)
    total, parts = EFSMLoss()(pred, tgt)
    assert parts["s"].item() == 0.0 and parts["m"].item() == 0.0
    assert torch.isfinite(total)
    total.backward()
    for k in "efsm":
        assert torch.isfinite(pred[k].grad).all(), k
    assert (pred["s"].grad == 0).all() and (pred["m"].grad == 0).all()
    assert pred["e"].grad.abs().sum() > 0 and pred["f"].grad.abs().sum() > 0


def test_per_atom_magmom_mask():
    pred = {"m": torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=torch.float64)}
    tgt = Targets(m=torch.tensor([1.05, 0.0, 2.0, 0.0], dtype=torch.float64),
                  m_mask=torch.tensor([True, False, True, False]))
    _, parts = EFSMLoss()(pred, tgt)
    assert parts["m"].item() == pytest.approx((0.5 * 0.05**2 + 0.1 * (1.0 - 0.05)) / 2, rel=1e-12)


def test_gradients_flow_to_predictions():
    pred, tgt = toy()
    pred = {k: v.clone().requires_grad_(True) for k, v in pred.items()}
    total, _ = EFSMLoss(loss="mse")(pred, tgt)
    total.backward()
    # d/dp of w * mean((p - y)^2) = 2 w (p - y) / n
    assert torch.allclose(pred["e"].grad, 2 * 2.0 * (pred["e"] - tgt.e).detach() / 2)
    assert torch.allclose(pred["f"].grad, 2 * 1.5 * (pred["f"] - tgt.f).detach() / 15)


def test_loss_source_has_no_host_sync():
    """Static check: the loss forward and the metric update never call .item() & co."""
    src = Path(loss_mod.__file__).read_text()
    tree = ast.parse(src)
    device_side = {"EFSMLoss", "_terms", "_masked_mean", "_atom_graph", "update"}
    sync = {"item", "tolist", "cpu", "numpy"}
    checked, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in device_side:
            checked.add(node.name)
            for sub in ast.walk(node):
                if (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute)
                        and sub.func.attr in sync):
                    found.append(f"{node.name}:{sub.lineno}: .{sub.func.attr}()")
    assert checked == device_side
    assert not found, found


def test_loss_and_metrics_make_no_host_transfers():
    pred, tgt = toy()
    pred = {k: v.clone().requires_grad_(True) for k, v in pred.items()}
    tgt.m_mask = torch.zeros(5, dtype=torch.bool)
    acc = MAEAccumulator()
    with forbid_host_sync():
        total, _ = EFSMLoss()(pred, tgt)
        total.backward()
        acc.update(pred, tgt)
    assert torch.isfinite(total)


# ------------------------------------------------------------------------------------------------
# metrics


def test_mae_accumulator_matches_concatenation_and_ignores_masked():
    p1, t1 = toy(n=(2, 3), seed=1)
    p2, t2 = toy(B=3, n=(1, 4, 2), seed=2)
    t1.f_mask = torch.tensor([True, False])
    t2.m_mask = torch.tensor([True, False, False, True, True, False, True])
    t2.e_mask = torch.tensor([False, True, True])
    t2.e[0] = 1e9  # masked out
    acc = MAEAccumulator()
    acc.update(p1, t1)
    acc.update(p2, t2)
    out = acc.compute()
    assert set(out) == {"e_mae", "f_mae", "s_mae", "m_mae"}

    def ref(k, extra=None):
        p = torch.cat([p1[k], p2[k]])
        y = torch.cat([getattr(t1, k), getattr(t2, k)])
        keep = extra if extra is not None else torch.ones(p.shape[0], dtype=torch.bool)
        return (p[keep] - y[keep]).abs().mean().item()

    assert out["e_mae"] == pytest.approx(ref("e", torch.tensor([1, 1, 0, 1, 1], dtype=torch.bool)))
    f_keep = torch.tensor([0, 0, 0, 0, 0] + [1] * 7, dtype=torch.bool)
    f_keep[:2] = True  # structure 0 of batch 1 has 2 atoms with labels
    assert out["f_mae"] == pytest.approx(ref("f", f_keep))
    assert out["s_mae"] == pytest.approx(ref("s"))
    assert out["m_mae"] == pytest.approx(ref("m", torch.cat([t1.m_mask, t2.m_mask])))
    acc.reset()
    assert all(math.isnan(v) for v in acc.compute().values())
    # a target never labelled (or never predicted) stays NaN
    acc.update({"e": p1["e"], "f": p1["f"]}, t1)
    res = acc.compute()
    assert math.isnan(res["s_mae"]) and math.isnan(res["m_mae"]) and math.isfinite(res["e_mae"])


# ------------------------------------------------------------------------------------------------
# collation of labels


def test_collate_targets_with_missing_labels():
    structs = [make("rocksalt", ["Na", "Cl"]), make("bcc", ["Fe"]), make("cscl", ["Cs", "Cl"])]
    batch = fastchgnet.collate(fastchgnet.build_graphs(structs))
    n = batch.n_atoms.tolist()
    labels = [
        {"e": -3.0, "f": np.ones((n[0], 3)), "s": np.eye(3), "m": None},
        {"e": None, "f": None, "s": None, "m": [2.2] * n[1]},
        {"e": torch.tensor(-1.5), "f": torch.zeros(n[2], 3), "m": [0.1, float("nan")]},
    ]
    t = collate_targets(labels, batch)
    assert t.e.dtype == batch.dtype and t.e.shape == (3,)
    assert t.f.shape == (batch.num_atoms, 3) and t.s.shape == (3, 3, 3)
    assert t.m.shape == (batch.num_atoms,)
    assert t.e_mask.tolist() == [True, False, True]
    assert t.f_mask.tolist() == [True, False, True]
    assert t.s_mask.tolist() == [True, False, False]
    assert t.m_mask.tolist() == [False] * n[0] + [True] * n[1] + [True, False]
    assert torch.isfinite(t.m).all() and torch.isfinite(t.f).all()
    assert torch.equal(t.atom_graph, batch.atom_graph)
    t64 = t.to("cpu", torch.float64)
    assert t64.f.dtype == torch.float64 and t64.f_mask.dtype == torch.bool
    with pytest.raises(ValueError, match="forces"):
        collate_targets([{"f": np.zeros((5, 3))}, {}, {}], batch)
    with pytest.raises(ValueError, match="unknown label keys"):
        collate_targets([{"energy": 1.0}, {}, {}], batch)
    with pytest.raises(ValueError):
        collate_targets([{}], batch)


# ------------------------------------------------------------------------------------------------
# learning rate, optimizer, schedule


def test_default_lr():
    assert default_lr(16) == 3.75e-5
    assert default_lr(128) == 3e-4
    assert default_lr(256) == pytest.approx(6e-4)
    with pytest.raises(ValueError):
        default_lr(0)


def _sched(total=50, warmup=0, ratio=0.01, lr=1e-3):
    net = torch.nn.Linear(3, 1)
    opt = make_optimizer(net, lr)
    return net, opt, make_scheduler(opt, total, warmup_steps=warmup, min_lr_ratio=ratio)


def _lrs(opt, sched, steps):
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_optimizer_skips_frozen_parameters():
    net = fastchgnet.CHGNet(fastchgnet.CHGNetConfig(atom_fea_dim=16, bond_fea_dim=16,
                                                    angle_fea_dim=16, n_conv=2,
                                                    mlp_hidden_dims=(16,)))
    opt = make_optimizer(net, 1e-3, weight_decay=1e-5)
    assert isinstance(opt, torch.optim.Adam)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(net.atom_ref) not in ids
    assert len(ids) == sum(p.requires_grad for p in net.parameters())
    assert opt.param_groups[0]["weight_decay"] == 1e-5


def test_cosine_schedule_endpoints_and_monotonic():
    _, opt, sched = _sched(total=50, ratio=0.01, lr=1e-3)
    lrs = _lrs(opt, sched, 60)
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[25] == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5), rel=1e-12)  # half way
    assert lrs[50] == pytest.approx(1e-5, rel=1e-12)
    assert all(a >= b for a, b in zip(lrs[:51], lrs[1:51]))
    assert all(a > b for a, b in zip(lrs[:50], lrs[1:51]))
    assert lrs[50:] == pytest.approx([1e-5] * 10)  # stays at the floor


def test_warmup():
    _, opt, sched = _sched(total=40, warmup=10, ratio=0.1, lr=2e-3)
    lrs = _lrs(opt, sched, 41)
    assert lrs[:10] == pytest.approx([2e-3 * (t + 1) / 10 for t in range(10)])
    assert lrs[10] == pytest.approx(2e-3) and max(lrs) == pytest.approx(2e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[40] == pytest.approx(2e-4)
    with pytest.raises(ValueError):
        _sched(total=10, warmup=11)


def test_schedule_state_dict_resume():
    torch.manual_seed(0)
    net, opt, sched = _sched(total=30, warmup=5, ratio=0.05)
    full = _lrs(opt, sched, 30)

    torch.manual_seed(0)
    net, opt, sched = _sched(total=30, warmup=5, ratio=0.05)
    first = _lrs(opt, sched, 12)
    state = copy.deepcopy({"opt": opt.state_dict(), "sched": sched.state_dict(),
                           "net": net.state_dict()})
    # a fresh run built the same way, then resumed from the saved state
    net2, opt2, sched2 = _sched(total=30, warmup=5, ratio=0.05)
    net2.load_state_dict(state["net"])
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    rest = _lrs(opt2, sched2, 18)
    assert first + rest == full  # identical, not just close
    assert state["sched"]["lr_lambdas"][0]["total_steps"] == 30


# ------------------------------------------------------------------------------------------------
# end to end with the real model


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is as fast and immune to CPU contention (restored)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def test_end_to_end_training_steps(one_thread):
    torch.manual_seed(0)
    net = fastchgnet.CHGNet(fastchgnet.CHGNetConfig(
        atom_fea_dim=16, bond_fea_dim=16, angle_fea_dim=16, num_radial=7, num_angular=7, n_conv=2,
        atom_conv_hidden_dim=16, bond_conv_hidden_dim=16, mlp_hidden_dims=(16,)))
    net.train()
    structs = [make("rocksalt", ["Na", "Cl"], rattle=0.05, seed=1),
               make("perovskite", ["Sr", "Ti", "O"], rattle=0.05, seed=2)]
    batch = fastchgnet.collate(fastchgnet.build_graphs(structs))
    rng = np.random.default_rng(0)
    n = batch.n_atoms.tolist()
    labels = [{"e": float(rng.normal(-4, 1)), "f": rng.normal(0, 0.3, (k, 3)),
               "s": rng.normal(0, 1.0, (3, 3)), "m": rng.uniform(0, 1, k)} for k in n]
    labels[0]["s"] = None  # one missing stress
    targets = collate_targets(labels, batch)
    loss_fn = EFSMLoss()

    out = net(batch, task="efsm", create_graph=True)
    total, parts = loss_fn(out, targets)
    assert set(parts) == {"e", "f", "s", "m"} and torch.isfinite(total)
    total.backward()
    # parameters the forward never reads get no gradient: with n_conv=2 the angle update of the
    # last (only) block is skipped because its output is never used
    unused = {name for name, _ in net.named_parameters() if name.startswith("angle_updates.0.")}
    grads = {name: p.grad for name, p in net.named_parameters()
             if p.requires_grad and name not in unused}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        sorted(k for k, g in grads.items() if g is None or not torch.isfinite(g).all())
    nonzero = [name for name, g in grads.items() if g.abs().sum() > 0]
    assert len(nonzero) >= 0.9 * len(grads), sorted(set(grads) - set(nonzero))
    assert "site_wise.weight" in nonzero  # the magmom loss reaches its head
    # the force loss reaches the parameters through the second derivative
    net.zero_grad()
    out = net(batch, task="ef", create_graph=True)
    f_only, _ = EFSMLoss(e=0.0, f=1.0)(out, targets)
    f_only.backward()
    assert sum(p.grad.abs().sum() for p in net.parameters() if p.grad is not None) > 0

    opt = make_optimizer(net, 5e-3)
    acc = MAEAccumulator()
    losses = []
    for _ in range(20):
        opt.zero_grad()
        out = net(batch, task="efsm", create_graph=True)
        total, _ = loss_fn(out, targets)
        total.backward()
        opt.step()
        losses.append(total.item())
        acc.update(out, targets)
    assert losses[-1] < 0.8 * losses[0], losses
    mae = acc.compute()
    assert all(math.isfinite(v) for v in mae.values())
