"""torch.compile: compiled interaction blocks and the compiled heads training step (on the CPU).

Most tests use the ``aot_eager`` backend: Dynamo captures the graph (so graph breaks and
recompilations are exactly those of Inductor) and AOTAutograd builds forward and backward, but
the graphs run eagerly, which keeps compilation fast. One slow test runs Inductor itself.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch

from fastchgnet.compile import (CompileCounter, CompiledStep, compile_blocks, compile_callable,
                                uncompile_blocks)
from fastchgnet.data import build_graphs, collate
from fastchgnet.data.prototypes import random_structures
from fastchgnet.model import CHGNet, DecoupledCHGNet, HeadsCHGNet
from fastchgnet.train.loss import EFSMLoss, collate_targets

SMALL = dict(atom_fea_dim=16, bond_fea_dim=16, angle_fea_dim=16, num_radial=7, num_angular=7,
             atom_conv_hidden_dim=16, bond_conv_hidden_dim=16, mlp_hidden_dims=(16,), n_conv=3,
             head_hidden_dim=16)
N_BLOCKS = SMALL["n_conv"] - 1


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def pool():
    return build_graphs(random_structures(60, seed=0, max_atoms=10))


def _batches(pool, n, seed=0, dtype=torch.float64):
    """``n`` (batch, targets) pairs of 2..6 random structures: every batch a different size."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        gs = [pool[i] for i in rng.choice(len(pool), size=int(rng.integers(2, 7)), replace=False)]
        b = collate(gs, dtype=dtype)
        labels = [dict(e=-3.0 + rng.normal(), f=rng.normal(size=(g.n_atoms, 3)),
                       s=rng.normal(size=(3, 3)), m=rng.random(g.n_atoms)) for g in gs]
        out.append((b, collate_targets(labels, b)))
    return out


def _model(cls, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(**SMALL, **kw).double()


def _same_updates(step, comp_m, eager_m, eager_opt, loss_fn, batches, rtol):
    """Compiled steps and eager steps give the same losses and, afterwards, the same parameters."""
    for b, t in batches:
        loss_c = step(b, t)
        eager_opt.zero_grad()
        loss_e, _ = loss_fn(eager_m(b, task="efsm"), t, b)
        loss_e.backward()
        eager_opt.step()
        torch.testing.assert_close(loss_c, loss_e.detach(), rtol=rtol * 1e-2, atol=1e-9)
    for (n, p), q in zip(comp_m.named_parameters(), eager_m.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=rtol * 1e-2, msg=n)


def _recompiles_after_warmup(call, batches, counter, warmup=3):
    for b, t in batches[:warmup]:
        call(b, t)
    after_warmup = counter.frame_count
    for b, t in batches[warmup:]:
        call(b, t)
    return after_warmup, counter.frame_count - after_warmup


@pytest.mark.parametrize("cls", [DecoupledCHGNet, CHGNet])
def test_compiled_blocks_equal_eager_without_graph_breaks_or_recompiles(cls, pool):
    m = _model(cls).eval()
    batches = _batches(pool, 53)
    eager = [m(b, task="efsm") for b, _ in batches[:4]]
    cc = CompileCounter("aot_eager")
    compile_blocks(m, backend=cc)  # fullgraph=True: a graph break would raise
    compiled = [m(b, task="efsm") for b, _ in batches[:4]]
    for a, c in zip(eager, compiled):
        for k in "efsm":
            torch.testing.assert_close(c[k], a[k], rtol=1e-9, atol=1e-10)
    # one graph per block index (a Python constant) ...
    assert cc.frame_count == N_BLOCKS
    # ... and none for the next 50 batches of other sizes
    warm, recompiles = _recompiles_after_warmup(lambda b, t: m(b, task="efsm"), batches, cc)
    assert recompiles <= 2, f"{recompiles} recompilations over 50 batches"
    uncompile_blocks(m)
    assert m.compiled_block is None


def test_second_order_training_falls_back_to_eager_blocks(pool):
    m = _model(DecoupledCHGNet).train()
    ref = _model(DecoupledCHGNet).train()
    cc = CompileCounter("aot_eager")
    compile_blocks(m, backend=cc)
    b, t = _batches(pool, 1)[0]
    for net in (m, ref):
        loss, _ = EFSMLoss()(net(b, task="efsm", create_graph=True), t, b)
        loss.backward()  # through the force gradient: would fail in a compiled block
    assert cc.frame_count == 0
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=n)


@pytest.mark.parametrize("force_head", ["direct", "pair+direct"])
def test_compiled_heads_step_equals_eager_and_does_not_recompile(pool, force_head):
    batches = _batches(pool, 53, seed=1)
    eager_m, comp_m = (_model(HeadsCHGNet, force_head=force_head).train() for _ in range(2))
    loss_fn = EFSMLoss()
    cc = CompileCounter("aot_eager")
    step = CompiledStep(comp_m, loss_fn, torch.optim.Adam(comp_m.parameters(), 1e-3), backend=cc)
    eager_opt = torch.optim.Adam(eager_m.parameters(), 1e-3)
    _same_updates(step, comp_m, eager_m, eager_opt, loss_fn, batches[:3], rtol=1e-7)
    assert cc.frame_count == 1  # the whole step is one graph (fullgraph: no break)
    warm, recompiles = _recompiles_after_warmup(step, batches, cc)
    assert recompiles <= 2, f"{recompiles} recompilations over 50 batches"


@pytest.mark.parametrize("cls", [CHGNet, DecoupledCHGNet])
def test_compiled_second_order_forward_equals_eager_in_one_graph(pool, cls):
    """A training forward of a model with autograd forces, compiled: the energy gradient is
    taken by torch.func.grad inside the graph (no break), and the loss's backward through the
    forces gives the eager gradients; other batch sizes do not recompile."""
    batches = _batches(pool, 23, seed=2)
    comp_m, eager_m = _model(cls).train(), _model(cls).train()
    cc = CompileCounter("aot_eager")
    fwd = compile_callable(comp_m, backend=cc)
    loss_fn = EFSMLoss()
    for b, t in batches[:2]:
        for net, call in ((comp_m, fwd), (eager_m, eager_m)):
            net.zero_grad()
            out = call(b, task="efsm", create_graph=True)
            loss, _ = loss_fn(out, t, b)
            loss.backward()
            net.outs = (out, loss.detach())
        for k in "efsm":
            torch.testing.assert_close(comp_m.outs[0][k], eager_m.outs[0][k], rtol=1e-9,
                                       atol=1e-10)
        torch.testing.assert_close(comp_m.outs[1], eager_m.outs[1], rtol=1e-10, atol=1e-12)
        for (n, p), q in zip(comp_m.named_parameters(), eager_m.parameters()):
            assert (p.grad is None) == (q.grad is None), n
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=n)
    assert cc.frame_count == 1  # fullgraph: a break would raise
    warm, recompiles = _recompiles_after_warmup(
        lambda b, t: fwd(b, task="efsm", create_graph=True), batches, cc)
    assert recompiles <= 2, f"{recompiles} recompilations over 20 batches"


def test_compiled_float32_forward_takes_plain_products(pool):
    """float32 on the CPU: eager calls use oneDNN, the traced gradient F.linear (torch.func
    transforms support neither oneDNN path), and the two agree."""
    from fastchgnet.nn import linear as lin

    b, t = _batches(pool, 1, seed=4, dtype=torch.float32)[0]
    torch.manual_seed(0)
    m = CHGNet(**SMALL).train()
    fwd = compile_callable(m, backend=CompileCounter("aot_eager"))
    with lin.plain_products():
        assert not lin.use_onednn(torch.zeros(4096, 8))
    comp = fwd(b, task="efsm", create_graph=True)
    ref = m(b, task="efsm", create_graph=True)
    for k in "efsm":
        torch.testing.assert_close(comp[k], ref[k], rtol=1e-4, atol=1e-5)


def test_compiled_step_refuses_models_that_need_second_derivatives():
    m = _model(DecoupledCHGNet)
    with pytest.raises(ValueError, match="second-order"):
        CompiledStep(m, EFSMLoss(), torch.optim.Adam(m.parameters()))


def test_triton_kernels_are_custom_ops_inside_the_graph(pool, monkeypatch):
    """The fused kernels (Triton; interpreted on the CPU) are single torch.library ops in the
    captured graph of the heads step, not graph breaks."""
    from fastchgnet import kernels

    if not kernels.has_triton():
        pytest.skip("triton is not installed")
    if not (torch.cuda.is_available() or kernels.interpreting()):
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("FASTCHGNET_KERNELS", "triton")
    dtype = torch.float64 if not torch.cuda.is_available() else torch.float32
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = _model(HeadsCHGNet).to(dev, dtype).train()
    cc = CompileCounter("aot_eager")
    step = CompiledStep(m, EFSMLoss(), torch.optim.Adam(m.parameters(), 1e-3), backend=cc)
    small = build_graphs(random_structures(3, seed=2, max_atoms=4))
    b = collate(small[:2], dtype=dtype)
    labels = [dict(e=-1.0, f=np.zeros((g.n_atoms, 3)), s=np.zeros((3, 3)), m=np.zeros(g.n_atoms))
              for g in small[:2]]
    t = collate_targets(labels, b)
    loss = step(b.to(dev), t.to(dev))
    assert torch.isfinite(loss)
    ops = cc.op_names()
    for name in ("fastchgnet::radial_bases", "fastchgnet::angle_basis", "fastchgnet::gated_epilogue"):
        assert any(name in o for o in ops), (name, sorted(o for o in ops if "fastchgnet" in o))


@pytest.mark.slow
def test_inductor_compiled_heads_step_equals_eager(pool):
    """Inductor itself (C++ codegen on the CPU; minutes on 2 cores)."""
    batches = _batches(pool, 3, seed=3)
    comp_m, eager_m = _model(HeadsCHGNet).train(), _model(HeadsCHGNet).train()
    loss_fn = EFSMLoss()
    step = CompiledStep(comp_m, loss_fn, torch.optim.SGD(comp_m.parameters(), 1e-3))
    opt = torch.optim.SGD(eager_m.parameters(), 1e-3)
    _same_updates(step, comp_m, eager_m, opt, loss_fn, batches, rtol=1e-6)


@pytest.mark.parametrize("old, new", [("fastchgnet.model.compile", "fastchgnet.compile"),
                                      ("fastchgnet.md.compiled", "fastchgnet.compile"),
                                      ("fastchgnet.md.batched", "fastchgnet.sim")])
def test_deprecated_modules_warn_and_reexport(old, new):
    """The old module paths still import, warn, and hand out the very objects of the new place."""
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to .*removed in 0\.2"):
        shim = importlib.import_module(old)
    home = importlib.import_module(new)
    homes = [home, *(m for n, m in list(sys.modules.items()) if n.startswith(new + ".")),
             *(importlib.import_module(m) for m in ("fastchgnet.keys", "fastchgnet.units",
                                                    "fastchgnet.nn.scatter"))]
    for name in shim.__all__:
        obj = getattr(shim, name)
        assert any(obj is v for m in homes for v in vars(m).values()), f"{old}.{name}"
    public = [n for n in shim.__all__ if not n.startswith("_") and hasattr(home, n)]
    assert public and all(getattr(shim, n) is getattr(home, n) for n in public)
