"""The model's linear map (fastchgnet.nn.linear): oneDNN products on the CPU, same values and
first and second derivatives as ``F.linear``; and the bond/angle updates on the angles' rows."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fastchgnet
from fastchgnet.data.batch import angle_rows
from fastchgnet.nn import linear as lin
from fastchgnet.nn.linear import MIN_ROWS, input_gradients_only, linear, use_onednn

needs_onednn = pytest.mark.skipif(not lin._ONEDNN, reason="torch without oneDNN")


@pytest.fixture(autouse=True)
def _onednn_on(monkeypatch):
    """The oneDNN path on whatever processor runs the tests (on most it is off by default)."""
    monkeypatch.setenv("FASTCHGNET_CPU_GEMM", "onednn")


@pytest.mark.parametrize("info, expect", [
    ({"vendor_id": "AuthenticAMD", "cpu family": "26", "model": "2"}, True),  # Zen 5
    ({"vendor_id": "AuthenticAMD", "cpu family": "25", "model": "17"}, False),  # Zen 4
    ({"vendor_id": "AuthenticAMD", "cpu family": "25", "model": "1"}, False),  # Zen 3
    ({"vendor_id": "GenuineIntel", "cpu family": "6", "model": "143"}, False),
    ({}, False),  # no /proc/cpuinfo
])
def test_onednn_preferred_by_processor_and_switch(monkeypatch, info, expect):
    assert lin._prefers_onednn(info) is expect
    monkeypatch.setattr(lin, "_HOST_PREFERS_ONEDNN", expect)
    monkeypatch.delenv("FASTCHGNET_CPU_GEMM")
    assert lin.onednn_preferred() is expect
    assert lin.use_onednn(torch.zeros(4096, 8)) is (expect and lin._ONEDNN)
    for value, want in (("aten", False), ("onednn", True), ("auto", expect), ("", expect)):
        monkeypatch.setenv("FASTCHGNET_CPU_GEMM", value)
        assert lin.onednn_preferred() is want, value


def _inputs(n=MIN_ROWS + 37, k=24, m=40, seed=0, contiguous=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2 * k if not contiguous else k, generator=g)
    if not contiguous:  # a column slice, as the gated layers' halves
        x = x[:, k:]
    w = torch.randn(m, k, generator=g) / k ** 0.5
    b = torch.randn(m, generator=g)
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_()


def _second_order(fn, x, w, b):
    """A loss on the input gradient (as training on forces), differentiated again."""
    y = torch.tanh(fn(x, w, b)).pow(2).sum()
    (gx,) = torch.autograd.grad(y, x, create_graph=True)
    loss = gx.pow(2).sum() + y
    return [t.detach() for t in torch.autograd.grad(loss, (x, w, b))] + [y.detach()]


@needs_onednn
@pytest.mark.parametrize("contiguous", [True, False])
def test_values_and_derivatives_equal_f_linear(contiguous):
    x, w, b = _inputs(contiguous=contiguous)
    assert use_onednn(x)
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    for a, r in zip(_second_order(linear, x, w, b), _second_order(F.linear, x, w, b)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_weight_gradient_of_a_plain_backward():
    x, w, b = _inputs(n=3 * MIN_ROWS)
    linear(x, w, b).pow(2).sum().backward()
    got = (x.grad, w.grad, b.grad)
    for t in (x, w, b):
        t.grad = None
    F.linear(x, w, b).pow(2).sum().backward()
    for a, r in zip(got, (x.grad, w.grad, b.grad)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-3)


@needs_onednn
def test_input_gradients_only_skips_the_weights_and_nothing_else():
    x, w, b = _inputs()
    calls = []
    real = lin._weight_grad
    lin._weight_grad = lambda g, x_: calls.append(1) or real(g, x_)
    try:
        y = linear(x, w, b).pow(2).sum()
        with input_gradients_only():
            (gx,) = torch.autograd.grad(y, x, create_graph=True)
        assert not calls  # the weights' gradient was not computed for the input gradient
        torch.testing.assert_close(gx, torch.autograd.grad(F.linear(x, w, b).pow(2).sum(), x)[0],
                                   rtol=1e-4, atol=1e-4)
        gx.pow(2).sum().backward()  # outside the scope: the weights get their gradients
        assert calls and w.grad is not None and b.grad is not None
    finally:
        lin._weight_grad = real


def test_small_float64_and_switched_off_inputs_use_addmm(monkeypatch):
    x, _, _ = _inputs(n=MIN_ROWS - 1)
    assert not use_onednn(x)
    assert not use_onednn(_inputs()[0].double())
    big = _inputs()[0]
    monkeypatch.setenv("FASTCHGNET_CPU_GEMM", "aten")
    assert not use_onednn(big)
    x, w, b = _inputs(n=7)
    torch.testing.assert_close(linear(x.double(), w.double(), b.double()),
                               F.linear(x.double(), w.double(), b.double()))


@needs_onednn
def test_compiled_graph_calls_the_onednn_op():
    from fastchgnet.compile.settings import CompileCounter, compile_callable

    counter = CompileCounter("aot_eager")
    fn = compile_callable(lambda x, w, b: linear(x, w, b), backend=counter)
    x, w, b = _inputs(n=50)  # any size: no size test inside a graph
    torch.testing.assert_close(fn(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert any("onednn_linear" in name for name in counter.op_names())


@needs_onednn
def test_inductor_calls_the_row_dispatching_op():
    """Compiled by Inductor, the op becomes ``fastchgnet::cpu_linear`` (no custom-op Python
    layers), which takes MKL's mm below MIN_ROWS rows and oneDNN from there on, chosen at
    each call: both sizes run the same compiled code and equal F.linear."""
    from torch._inductor.utils import run_and_get_code

    from fastchgnet.compile.lowering import register_gemm_lowering
    from fastchgnet.compile.settings import compile_callable

    assert register_gemm_lowering() and register_gemm_lowering()  # idempotent
    w = torch.randn(16, 8)
    torch._dynamo.reset()
    fn = compile_callable(lambda x, w: linear(x, w) * 2.0)
    x = torch.randn(40, 8)
    with torch._inductor.config.patch(fx_graph_cache=False):  # code compiled here, not cached
        out, code = run_and_get_code(fn, x, w)
    torch.testing.assert_close(out, F.linear(x, w) * 2.0, rtol=1e-5, atol=1e-5)
    text = "\n".join(code)
    assert "torch.ops.fastchgnet.cpu_linear" in text
    assert "torch.ops.fastchgnet.onednn_linear.default(" not in text
    big = torch.randn(MIN_ROWS + 5, 8)
    torch.testing.assert_close(fn(big, w), F.linear(big, w) * 2.0, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_row_dispatching_op_picks_by_rows(monkeypatch):
    calls = []
    monkeypatch.setattr(lin, "_onednn", lambda x, w, b: calls.append(x.shape[0]) or F.linear(x, w))
    w = torch.randn(16, 8)
    for rows in (7, MIN_ROWS):
        x = torch.randn(rows, 8)
        torch.testing.assert_close(torch.ops.fastchgnet.cpu_linear(x, w), F.linear(x, w))
    assert calls == [MIN_ROWS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_graph_product_equals_mm(monkeypatch, dtype):
    """``fastchgnet::cpu_mm`` (Inductor's product in compiled training graphs): ``a @ b`` for a
    tall product, both weight-gradient orientations, a small product and float64, always
    contiguous; oneDNN only for float32 with many rows or a reduction over many rows."""
    calls = []
    real = lin._onednn
    monkeypatch.setattr(lin, "_onednn", lambda x, w, b: calls.append(tuple(x.shape)) or real(x, w, b))
    n = MIN_ROWS + 9
    x, g, w = (torch.randn(n, 8, dtype=dtype), torch.randn(n, 12, dtype=dtype),
               torch.randn(12, 8, dtype=dtype))
    cases = [(x, w.t()), (g, w), (g.t(), x), (x.t(), g), (x[:7], w.t())]
    for a, b in cases:
        out = torch.ops.fastchgnet.cpu_mm(a, b)
        assert out.is_contiguous() and out.shape == (a.shape[0], b.shape[1])
        torch.testing.assert_close(out, a @ b, rtol=1e-5, atol=1e-4)
    # oneDNN's input: the tall operand, or the narrower side of a weight gradient
    assert calls == ([(n, 8), (n, 12), (8, n), (8, n)] if dtype == torch.float32 else [])


@needs_onednn
def test_compiled_training_products_take_the_row_dispatching_op(monkeypatch):
    """Where oneDNN is preferred, Inductor's post-grad pass turns the ``mm``/``addmm`` of a
    compiled second-order training forward (plain products under ``torch.func``) and of its
    backward into ``fastchgnet::cpu_mm``; values and parameter gradients equal eager ones."""
    from fastchgnet.compile import lowering
    from fastchgnet.compile.settings import compile_callable

    rewrites = []
    real = lowering.rewrite_products
    monkeypatch.setattr(lowering, "rewrite_products", lambda g: rewrites.append(real(g)) or rewrites[-1])
    torch.manual_seed(0)
    w1, b1, w2 = torch.randn(16, 3), torch.randn(16), torch.randn(1, 16)
    params = [p.requires_grad_() for p in (w1, b1, w2)]

    def forward(pos):
        def energy(v):
            return F.linear(torch.tanh(F.linear(v, w1, b1)), w2).sum()

        with lin.plain_products():
            e, grad = torch.func.grad_and_value(energy)(pos)[::-1]
        return e, -grad

    pos = torch.randn(MIN_ROWS + 40, 3)
    torch._dynamo.reset()
    fn = compile_callable(forward)
    with torch._inductor.config.patch(fx_graph_cache=False):
        results = []
        for f in (fn, forward):
            e, force = f(pos)
            loss = e + (force ** 2).sum()
            results.append((e, force, torch.autograd.grad(loss, params)))
    torch._dynamo.reset()
    (e, force, grads), (e0, force0, grads0) = results
    torch.testing.assert_close(e, e0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(force, force0, rtol=1e-4, atol=1e-5)
    for g, g0 in zip(grads, grads0):
        torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-3)
    assert len(rewrites) >= 2 and all(n > 0 for n in rewrites[:2])  # forward and backward graphs


def test_training_products_stay_mm_where_onednn_is_not_preferred(monkeypatch):
    from fastchgnet.compile.settings import compile_callable
    from fastchgnet.compile import lowering

    monkeypatch.setenv("FASTCHGNET_CPU_GEMM", "aten")
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    compile_callable(lambda x: x)
    assert "post_grad_custom_post_pass" not in (seen[0]["options"] or {})
    monkeypatch.setenv("FASTCHGNET_CPU_GEMM", "onednn")
    compile_callable(lambda x: x)
    if lowering.gemm_pass() is not None:
        assert seen[1]["options"]["post_grad_custom_post_pass"] is lowering.gemm_pass()


# ---- the angles' rows (Batch.angle_rows) ----------------------------------------------------

def _batch(dtype=torch.float64):
    from fastchgnet.data.prototypes import random_structures

    return fastchgnet.collate(fastchgnet.build_graphs(random_structures(4, seed=3, max_atoms=10)),
                              dtype=dtype)


def test_angle_rows_renumber_the_legs():
    batch = _batch()
    rows, r1, r2 = batch.angle_rows, batch.angle_row1, batch.angle_row2
    assert torch.equal(rows[r1], batch.angle_bond1) and torch.equal(rows[r2], batch.angle_bond2)
    assert torch.all(rows[1:] > rows[:-1])  # sorted, no repeats
    assert rows.numel() < batch.num_bonds  # a part of the bonds
    # exactly the legs: every row is used
    used = torch.zeros(batch.num_bonds, dtype=torch.bool)
    used[batch.angle_bond1] = True
    used[batch.angle_bond2] = True
    assert torch.equal(rows, used.nonzero().squeeze(1))


def test_angle_rows_of_no_angles():
    import numpy as np

    rows, r1, r2 = angle_rows(np.zeros(0, np.int64), np.zeros(0, np.int64), 5)
    assert rows.shape == r1.shape == r2.shape == (0,)


@pytest.mark.parametrize("model_type", ["exact", "decoupled", "heads"])
def test_updates_on_the_rows_equal_updates_on_every_bond(model_type):
    from fastchgnet.model.config import CHGNetConfig

    torch.manual_seed(0)
    cfg = CHGNetConfig.with_overrides(None, atom_fea_dim=16, bond_fea_dim=16, angle_fea_dim=16,
                                      atom_conv_hidden_dim=16, bond_conv_hidden_dim=16,
                                      angle_layer_hidden_dim=0, mlp_hidden_dims=(16,),
                                      num_radial=5, num_angular=5, mlp_out_bias=True)
    cls = {"exact": fastchgnet.CHGNet, "decoupled": fastchgnet.DecoupledCHGNet,
           "heads": fastchgnet.HeadsCHGNet}[model_type]
    net = cls(cfg).double().eval()
    for p in net.parameters():  # LayerNorms and biases away from their initial 1 / 0
        p.data.add_(0.05 * torch.randn_like(p))
    batch = _batch()
    full = dataclasses.replace(batch, angle_rows=None, angle_row1=None, angle_row2=None)
    a, b = net(batch, task="efsm"), net(full, task="efsm")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-10)
