"""The fused GatedMLP epilogue kernel (``fastchgnet.kernels.gated``) against its plain-torch
reference :func:`fastchgnet.nn.functional.gated_epilogue`: values, first and second derivatives,
gradcheck/gradgradcheck, and torch.compile.

On a CPU-only machine the conftest sets ``TRITON_INTERPRET=1`` (kernels interpreted: shapes are
kept small). The "cpu" cases need the interpreter and are skipped when Triton compiles for a GPU;
the "cuda" cases run when a GPU is present.
"""

import pytest
import torch

pytest.importorskip("triton")

from fastchgnet.kernels import interpreting  # noqa: E402
from fastchgnet.kernels import gated as kg  # noqa: E402
from fastchgnet.nn import functional as ref  # noqa: E402

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreting(),
                                                 reason="CPU kernels need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device")),
]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}
# gradients sum over rows (parameter and weight gradients), so float32 gets a little more room
GTOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-11, rtol=1e-11)}


def make_inputs(n, d, m, dtype, device, seed=0, requires_grad=False):
    """core, gate, the four LayerNorm params, weight (m, d) or None."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift)
        return t.to(dtype=dtype, device=device).requires_grad_(requires_grad)

    core, gate = rnd(n, d, scale=2.0, shift=0.3), rnd(n, d, scale=1.5, shift=-0.2)
    params = [rnd(d, scale=0.5, shift=1.0), rnd(d, scale=0.3),
              rnd(d, scale=0.5, shift=1.0), rnd(d, scale=0.3)]
    weight = rnd(m, d) if m is not None else None
    return core, gate, params, weight


def weight_rows(n, mode):
    if mode is None:
        return None
    return n if mode == "full" else n // 2


def _inputs(core, gate, params, weight):
    return [core, gate, *params] + ([weight] if weight is not None else [])


# ------------------------------------------------------------------------------------------------
# values and first derivatives


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [64, 24])
@pytest.mark.parametrize("n", [0, 1, 7, 129])
@pytest.mark.parametrize("wmode", [None, "full", "half"])
def test_forward_and_grads(device, dtype, d, n, wmode):
    if wmode == "half" and (n % 2 or n == 0):
        pytest.skip("m = n / 2 needs an even, nonzero n")
    m = weight_rows(n, wmode)
    core, gate, params, weight = make_inputs(n, d, m, dtype, device, seed=n + d,
                                             requires_grad=True)
    out = kg.gated_epilogue(core, gate, *params, 1e-5, weight)
    assert out.shape == (n, d) and out.dtype == dtype and out.device.type == device
    ins = _inputs(core, gate, params, weight)
    gout = torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gout = gout.to(dtype=dtype, device=device)
    grads = torch.autograd.grad(out, ins, gout)
    if n == 0:
        # the reference cannot view an empty tensor as (-1, 0, d); the kernel path returns empty
        # outputs and zero gradients
        assert all(g.shape == x.shape and not g.abs().sum() for g, x in zip(grads, ins))
        if weight is None:
            torch.testing.assert_close(out, ref.gated_epilogue(core, gate, *params, 1e-5))
        return
    expect = ref.gated_epilogue(core, gate, *params, 1e-5, weight)
    torch.testing.assert_close(out, expect, **TOL[dtype])
    expect_grads = torch.autograd.grad(expect, ins, gout)
    names = ["core", "gate", "w_core", "b_core", "w_gate", "b_gate", "weight"]
    for name, g, e in zip(names, grads, expect_grads):
        torch.testing.assert_close(g, e, **GTOL[dtype], msg=lambda s, nm=name: f"{nm}: {s}")


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_and_expanded(device):
    """Strided inputs, leading dims, and a stride-0 upstream gradient (``out.sum()``)."""
    dtype = torch.float64
    core, gate, params, weight = make_inputs(6, 10, 3, dtype, device, requires_grad=True)
    core_t = core.detach().t().contiguous().t().requires_grad_()  # column-major (6, 10)
    gate_3d = gate.detach().view(2, 3, 10).requires_grad_()
    out = kg.gated_epilogue(core_t, gate_3d.view(6, 10), *params, 1e-5, weight)
    expect = ref.gated_epilogue(core_t, gate_3d.view(6, 10), *params, 1e-5, weight)
    torch.testing.assert_close(out, expect, **TOL[dtype])
    ins = [core_t, gate_3d, *params, weight]
    grads = torch.autograd.grad(out.sum(), ins)
    expect_grads = torch.autograd.grad(expect.sum(), ins)
    for g, e in zip(grads, expect_grads):
        torch.testing.assert_close(g, e, **GTOL[dtype])
    # leading dims are flattened to rows and restored
    c3, g3 = core.detach().view(2, 3, 10), gate.detach().view(2, 3, 10)
    out3 = kg.gated_epilogue(c3, g3, *params, 1e-5)
    assert out3.shape == (2, 3, 10)
    torch.testing.assert_close(out3, ref.gated_epilogue(c3, g3, *params, 1e-5), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_backward_program_loop(device, monkeypatch):
    """Backward programs that loop over several row blocks (and past the last one)."""
    monkeypatch.setattr(kg, "_MAX_BWD_PROGRAMS", 2)
    dtype = torch.float64
    core, gate, params, weight = make_inputs(129, 64, 43, dtype, device, requires_grad=True)
    ins = _inputs(core, gate, params, weight)
    gout = torch.randn(129, 64, generator=torch.Generator().manual_seed(2), dtype=dtype)
    gout = gout.to(device)
    grads = torch.autograd.grad(kg.gated_epilogue(core, gate, *params, 1e-5, weight), ins, gout)
    expect = torch.autograd.grad(ref.gated_epilogue(core, gate, *params, 1e-5, weight), ins, gout)
    for g, e in zip(grads, expect):
        torch.testing.assert_close(g, e, **GTOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_fallbacks(device):
    """No LayerNorm (w_core None) and too-wide rows go to the reference; bad weights raise."""
    core, gate, params, weight = make_inputs(4, 8, 2, torch.float32, device)
    torch.testing.assert_close(kg.gated_epilogue(core, gate, None, None, None, None, 1e-5, weight),
                               ref.gated_epilogue(core, gate, None, None, None, None, 1e-5, weight))
    wide = make_inputs(2, kg._MAX_D + 1, None, torch.float32, device)
    torch.testing.assert_close(kg.gated_epilogue(wide[0], wide[1], *wide[2]),
                               ref.gated_epilogue(wide[0], wide[1], *wide[2]))
    with pytest.raises(ValueError):
        kg.gated_epilogue(core, gate, *params, 1e-5, weight[:, :4])
    with pytest.raises(ValueError):
        kg.gated_epilogue(core, gate, *params, 1e-5, torch.cat([weight, weight[:1]]))


@pytest.mark.parametrize("m", [None, 6, 3])
@pytest.mark.parametrize("norm", [True, False])
def test_private_torch_math_is_the_reference(m, norm):
    """The kernels' own plain-torch copy (fallback and double backward; kernels/ cannot import
    fastchgnet.nn) computes exactly what the reference computes."""
    from fastchgnet.kernels._torch_math import gated_epilogue as copy

    core, gate, params, weight = make_inputs(6, 8, m, torch.float64, "cpu", seed=4)
    params = params if norm else [None] * 4
    assert torch.equal(copy(core, gate, *params, 1e-5, weight),
                       ref.gated_epilogue(core, gate, *params, 1e-5, weight))


# ------------------------------------------------------------------------------------------------
# gradcheck, second order


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [None, 4, 2])
def test_gradcheck(device, m):
    core, gate, params, weight = make_inputs(4, 8, m, torch.float64, device, seed=3,
                                             requires_grad=True)
    ins = tuple(_inputs(core, gate, params, weight))

    def fn(*xs):
        w = xs[6] if m is not None else None
        return kg.gated_epilogue(*xs[:6], 1e-5, w)

    # the interpreter makes full-mode checks slow (~10 ms a launch): full-mode gradcheck where it
    # is cheap enough, random-projection (fast_mode) checks for the rest
    assert torch.autograd.gradcheck(fn, ins, fast_mode=m == 2)
    assert torch.autograd.gradgradcheck(fn, ins, fast_mode=m is not None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [None, 5])
def test_second_order_matches_reference(device, dtype, m):
    """A force-in-the-loss pattern: first derivatives w.r.t. core and gate with create_graph,
    a loss of them, and its gradient w.r.t. every input."""
    n, d = 10, 24
    core, gate, params, weight = make_inputs(n, d, m, dtype, device, seed=7, requires_grad=True)
    ins = _inputs(core, gate, params, weight)
    gen = torch.Generator().manual_seed(11)
    v = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    u = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)

    def second(fn):
        out = fn(core, gate, *params, 1e-5, weight)
        g_core, g_gate, g_w = torch.autograd.grad((out * v).sum(), [core, gate, params[0]],
                                                  create_graph=True)
        loss = (g_core * u).sum() + (g_gate * g_gate).sum() + g_w.pow(2).sum() + out.sum()
        return torch.autograd.grad(loss, ins)

    for g, e in zip(second(kg.gated_epilogue), second(ref.gated_epilogue)):
        torch.testing.assert_close(g, e, **({torch.float32: dict(atol=1e-4, rtol=1e-4)}
                                            .get(dtype, GTOL[dtype])))


@pytest.mark.parametrize("device", DEVICES)
def test_third_order(device):
    """The double-backward formula is itself differentiable."""
    core, gate, params, weight = make_inputs(3, 8, 3, torch.float64, device, seed=5,
                                             requires_grad=True)

    def third(fn):
        out = fn(core, gate, *params, 1e-5, weight)
        (g1,) = torch.autograd.grad(out.pow(2).sum(), core, create_graph=True)
        (g2,) = torch.autograd.grad(g1.sin().sum(), gate, create_graph=True)
        return torch.autograd.grad(g2.pow(2).sum(), [core, gate, *params, weight])

    for g, e in zip(third(kg.gated_epilogue), third(ref.gated_epilogue)):
        torch.testing.assert_close(g, e, **GTOL[torch.float64])


# ------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [None, 3])
def test_compile_no_graph_break(device, m):
    dynamo = pytest.importorskip("torch._dynamo")
    if not dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this platform")
    core, gate, params, weight = make_inputs(6, 16, m, torch.float32, device, seed=9,
                                             requires_grad=True)
    ins = _inputs(core, gate, params, weight)

    def f(c, g, w_c, b_c, w_g, b_g, w):
        return kg.gated_epilogue(c, g, w_c, b_c, w_g, b_g, 1e-5, w).tanh().sum()

    dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)  # raises on a graph break
    got = compiled(core, gate, *params, weight)
    expect = f(core, gate, *params, weight)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    for g, e in zip(torch.autograd.grad(got, ins), torch.autograd.grad(expect, ins)):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
