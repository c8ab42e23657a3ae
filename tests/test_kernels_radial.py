"""The fused radial-basis Triton kernel (``kernels/radial.py``) against the plain-torch reference
:func:`fastchgnet.nn.functional.radial_bases`: values, first and second derivatives, and
torch.compile. On a CPU-only machine the kernels run under ``TRITON_INTERPRET=1`` (set by
conftest), so shapes stay small."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from fastchgnet.kernels import radial as kr  # noqa: E402
from fastchgnet.nn import functional as F  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CUT_A, CUT_B, P = 6.0, 3.0, 8  # CHGNet 0.3.0


def lengths(n: int, dtype, device, seed: int = 0) -> torch.Tensor:
    """``n`` bond lengths in [0.5, 6.5] Å: both cutoffs hit exactly, lengths beyond each."""
    g = torch.Generator().manual_seed(seed)
    r = 0.5 + 6.0 * torch.rand(n, generator=g, dtype=torch.float64)
    special = torch.tensor([CUT_B, CUT_A, 6.5, 0.5, 3.2, 2.9, 5.9], dtype=torch.float64)
    m = min(n, len(special))
    r[:m] = special[:m]
    return r.to(device=device, dtype=dtype)


def freqs(k: int, dtype, device, seed: int = 1) -> torch.Tensor:
    """CHGNet's initial frequencies ``k pi`` with a random perturbation (they are learned)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(k, generator=g, dtype=torch.float64)
    w = torch.arange(1, k + 1, dtype=torch.float64) * math.pi + 0.3 * noise
    return w.to(device=device, dtype=dtype)


def assert_close(a, b, atol):
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel():
        err = float((a - b).abs().max())
        assert err <= atol, f"max abs error {err:.3e} > {atol:.3e}"


def check(got, want, exact, ulps: float):
    """``got`` (kernel) against ``want`` (reference in the same dtype) and ``exact`` (reference in
    float64), errors in units of the result's largest magnitude.

    * float64, and float32 on the CPU (the interpreter evaluates the same IEEE operations as
      torch): within ``ulps`` epsilons of ``want``;
    * float32 on every device (on a GPU Triton's float32 division and sin may differ from torch's
      by an ulp or two, and an ulp of ``x = r / rc`` moves ``sin(w x)`` by up to ``eps |w x|``,
      with ``|w x|`` up to ~100): no worse than twice the float32 reference's own error against
      float64, plus ``ulps`` epsilons.
    """
    assert got.shape == want.shape and got.dtype == want.dtype
    if not got.numel():
        return
    eps = torch.finfo(got.dtype).eps
    scale = float(exact.abs().max())
    if got.dtype == torch.float64 or got.device.type == "cpu":
        assert_close(got, want, ulps * eps * scale)
    if got.dtype == torch.float32:
        ref_err = float((want.double() - exact).abs().max())
        assert_close(got.double(), exact, 2 * ref_err + ulps * eps * scale)


# ------------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", [0, 1, 7, 129])
def test_forward_matches_reference(n, dtype, device):
    r = lengths(n, dtype, device)
    fa, fb = freqs(31, dtype, device, 1), freqs(31, dtype, device, 2)
    a, b = kr.radial_bases(r, fa, fb, CUT_A, CUT_B, P)
    ra, rb = F.radial_bases(r, fa, fb, CUT_A, CUT_B, P)
    assert a.shape == (n, 31) and b.shape == (n, 31)
    assert a.dtype == dtype and b.dtype == dtype and a.device == r.device
    ea, eb = F.radial_bases(r.double(), fa.double(), fb.double(), CUT_A, CUT_B, P)
    check(a, ra, ea, ulps=16)
    check(b, rb, eb, ulps=16)
    # exactly zero at and beyond each cutoff
    assert (a[r >= CUT_A] == 0).all()
    assert (b[r >= CUT_B] == 0).all()
    if n >= 7:
        assert (b[r < CUT_B] != 0).any() and (b[r >= CUT_B] == 0).all() and (r >= CUT_B).sum() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p,cut_a,cut_b,ka,kb", [(0, 5.1, 2.7, 5, 5), (1, 4.3, 3.7, 5, 3),
                                                   (5, 6.1, 2.9, 3, 9)])
def test_forward_other_settings(p, cut_a, cut_b, ka, kb, device):
    """Other envelope orders (p = 0: none), cutoffs not representable in float32 (float64 keeps
    full precision), and different K for the two bases."""
    dtype = torch.float64
    r = lengths(37, dtype, device, seed=3)
    fa, fb = freqs(ka, dtype, device, 4), freqs(kb, dtype, device, 5)
    a, b = kr.radial_bases(r, fa, fb, cut_a, cut_b, p)
    ra, rb = F.radial_bases(r, fa, fb, cut_a, cut_b, p)
    assert_close(a, ra, 1e-12)
    assert_close(b, rb, 1e-12)


# ------------------------------------------------------------------------------------------------
# first derivatives


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", [0, 1, 7, 129])
def test_gradients_match_reference(n, dtype, device):
    r0 = lengths(n, dtype, device)
    fa0, fb0 = freqs(31, dtype, device, 1), freqs(31, dtype, device, 2)
    g = torch.Generator().manual_seed(7)
    ga = torch.randn(n, 31, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    gb = torch.randn(n, 31, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    def grads(fn, dt=dtype):
        r, fa, fb = (t.clone().to(dt).requires_grad_() for t in (r0, fa0, fb0))
        a, b = fn(r, fa, fb, CUT_A, CUT_B, P)
        return torch.autograd.grad((a, b), (r, fa, fb), (ga.to(dt), gb.to(dt)))

    got, want = grads(kr.radial_bases), grads(F.radial_bases)
    exact = grads(F.radial_bases, torch.float64)
    for x, y, z in zip(got, want, exact):
        check(x, y, z, ulps=32)  # sums of up to 129 terms


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_and_partial_gradients(device):
    """Upstream gradients that are stride-0 expansions (from ``.sum()``), and only one of the two
    bases used (the other's gradient is absent)."""
    dtype = torch.float64
    r0, fa0, fb0 = lengths(9, dtype, device), freqs(4, dtype, device, 1), freqs(4, dtype, device, 2)
    for loss in (lambda a, b: a.sum() + 2 * b.sum(), lambda a, b: a.sum(), lambda a, b: b.sum()):
        res = []
        for fn in (kr.radial_bases, F.radial_bases):
            r, fa, fb = (t.clone().requires_grad_() for t in (r0, fa0, fb0))
            a, b = fn(r, fa, fb, CUT_A, CUT_B, P)
            res.append(torch.autograd.grad(loss(a, b), (r, fa, fb), allow_unused=True,
                                           materialize_grads=True))
        for x, y in zip(*res):
            assert_close(x, y, 1e-11)


# ------------------------------------------------------------------------------------------------
# gradcheck, second derivatives


def _check_inputs(n, k, device):
    r = torch.tensor([0.7, 1.9, 2.6, 3.4, 5.2, 4.1, 1.3][:n], dtype=torch.float64, device=device)
    fa, fb = freqs(k, torch.float64, device, 1), freqs(k, torch.float64, device, 2)
    return tuple(t.requires_grad_() for t in (r, fa, fb))


def _f(r, fa, fb):
    return kr.radial_bases(r, fa, fb, CUT_A, CUT_B, P)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,k", [(5, 3), (3, 31)])
def test_gradcheck(n, k, device):
    inputs = _check_inputs(n, k, device)
    assert torch.autograd.gradcheck(_f, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,k", [(5, 3), (3, 31)])
def test_gradgradcheck(n, k, device):
    inputs = _check_inputs(n, k, device)
    assert torch.autograd.gradgradcheck(_f, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_force_loss_second_order(dtype, device):
    """Training's pattern: forces ``dE/dr`` in the loss, then the loss' parameter gradients (the
    backward op's own derivative; the coefficients ``c`` reach it as the upstream gradient)."""
    n, k = 23, 31
    r0 = lengths(n, dtype, device, seed=11)
    fa0, fb0 = freqs(k, dtype, device, 1), freqs(k, dtype, device, 2)
    g = torch.Generator().manual_seed(12)
    ca0 = torch.randn(k, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    cb0 = torch.randn(k, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    def run(fn):
        r, fa, fb, ca, cb = (t.clone().requires_grad_() for t in (r0, fa0, fb0, ca0, cb0))
        a, b = fn(r, fa, fb, CUT_A, CUT_B, P)
        energy = (a * ca).sum() + (b * cb).sum()
        force, d_fa, d_fb = torch.autograd.grad(energy, (r, fa, fb), create_graph=True)
        # training puts only forces into the loss; the frequency gradients check the remaining
        # terms of the second derivative
        loss = (force ** 2).sum() + (d_fa ** 2).sum() + (d_fb ** 2).sum()
        return (force.detach(), *torch.autograd.grad(loss, (r, fa, fb, ca, cb)))

    got, want = run(kr.radial_bases), run(F.radial_bases)
    for x, y in zip(got, want):
        scale = float(y.abs().max()) + 1.0
        rel = 1e-10 if dtype == torch.float64 else 2e-4
        assert_close(x, y, rel * scale)


def test_third_order_is_differentiable():
    """The backward op's own derivative is plain torch, so a third derivative exists too."""
    r, fa, fb = _check_inputs(4, 3, "cpu")

    def third(fn):
        a, b = fn(r, fa, fb, CUT_A, CUT_B, P)
        (d1,) = torch.autograd.grad((a.sum() + b.sum()), r, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), r, create_graph=True)
        return torch.autograd.grad(d2.sum(), (r, fa, fb))

    for x, y in zip(third(kr.radial_bases), third(F.radial_bases)):
        assert_close(x, y, 1e-9 * (float(y.abs().max()) + 1.0))


# ------------------------------------------------------------------------------------------------
# registration, torch.compile


def test_opcheck():
    """torch.library's own consistency checks of both ops (schema, fake tensors, autograd)."""
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:
        pytest.skip("torch.library.opcheck unavailable")
    r, fa, fb = _check_inputs(5, 3, "cpu")
    opcheck(torch.ops.fastchgnet.radial_bases.default, (r, fa, fb, CUT_A, CUT_B, P))
    ga, gb = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    opcheck(torch.ops.fastchgnet.radial_bases_backward.default,
            (ga, gb, r.detach(), fa.detach(), fb.detach(), CUT_A, CUT_B, P))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_no_graph_break(device):
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this Python/platform")
    from torch._dynamo.testing import CompileCounterWithBackend

    def f(r, fa, fb, ca, cb):
        a, b = kr.radial_bases(r, fa, fb, CUT_A, CUT_B, P)
        return (a * ca).sum() + (b * cb).sum().sin()

    dtype = torch.float64
    r0 = lengths(13, dtype, device)
    fa0, fb0 = freqs(31, dtype, device, 1), freqs(31, dtype, device, 2)
    g = torch.Generator().manual_seed(13)
    ca = torch.randn(31, generator=g, dtype=dtype).to(device)
    cb = torch.randn(31, generator=g, dtype=dtype).to(device)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    res = []
    for fn in (compiled, f):
        r, fa, fb = (t.clone().requires_grad_() for t in (r0, fa0, fb0))
        out = fn(r, fa, fb, ca, cb)
        res.append((out.detach(), *torch.autograd.grad(out, (r, fa, fb))))
    assert counter.frame_count == 1
    for x, y in zip(*res):
        assert_close(x, y, 1e-12 * (float(y.abs().max()) + 1.0))
