"""The fused angle-basis kernel (``fastchgnet.kernels.angle``) against the torch reference.

On CPU-only machines the kernels run under the Triton interpreter (set by conftest), so shapes stay
small. Float64 is compared to rounding; float32 to a tolerance set by the problem's conditioning
(one ulp of ``theta`` times ``w_k`` in the forward; near-parallel legs amplify rounding of the dot
product by ``1 / sin(theta)`` and its derivatives by higher powers, for the reference too).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from fastchgnet.kernels.angle import angle_basis  # noqa: E402
from fastchgnet.nn import functional as F  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_inputs(n_bonds: int, n_ang: int, n_freq: int, dtype, device, seed: int = 0,
                extreme: bool = True, margin: float = 1e-4, self_pair: bool = True):
    """Random unit vectors and angles.

    With ``extreme`` the bonds include a near-copy and a near-negation of bond 0 (angle ``margin``
    away from 0 and pi) and the first angles pair bond 0 with itself, its near-copy and its
    near-negation, under both signs: |cos| up to 1 (the clamp factor keeps everything finite).
    Finite differences need ``self_pair=False``: a perturbed bond paired with itself has
    |cos| > 1."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n_bonds, 3, generator=g, dtype=torch.float64)
    b1 = torch.randint(0, n_bonds, (n_ang,), generator=g)
    b2 = torch.randint(0, n_bonds, (n_ang,), generator=g)
    if not self_pair:
        b2 = (b1 + torch.randint(1, n_bonds, (n_ang,), generator=g)) % n_bonds
    if extreme and n_bonds >= 3:
        u = torch.nn.functional.normalize(u, dim=1)
        perp = torch.linalg.cross(u[0], u[3 % n_bonds] if n_bonds > 3 else torch.tensor(
            [0.3, -0.2, 0.9], dtype=torch.float64))
        perp = perp / perp.norm()
        u[1] = math.cos(margin) * u[0] + math.sin(margin) * perp
        u[2] = -math.cos(margin) * u[0] + math.sin(margin) * perp
        pairs = [(0, 0)] if self_pair else []
        pairs += [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2)]
        for i, (x, y) in enumerate(pairs[:n_ang]):
            b1[i], b2[i] = x, y
    u = torch.nn.functional.normalize(u, dim=1)
    sign = (torch.randint(0, 2, (n_ang,), generator=g) * 2 - 1).to(torch.float64)
    freq = torch.arange(1, n_freq + 1, dtype=torch.float64) + 0.1 * torch.randn(
        n_freq, generator=g, dtype=torch.float64)
    cast = dict(dtype=dtype, device=device)
    return (u.to(**cast), b1.to(device), b2.to(device), sign.to(**cast), freq.to(**cast))


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


# ------------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_ang", [0, 1, 7, 129])
def test_forward_float64(device, n_ang):
    u, b1, b2, s, w = make_inputs(11, n_ang, 15, torch.float64, device)
    out = angle_basis(u, b1, b2, s, w)
    ref = F.angle_basis(u, b1, b2, s, w)
    assert out.shape == (n_ang, 31) and out.dtype == torch.float64 and out.device == u.device
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_ang", [0, 1, 7, 129])
def test_forward_float32(device, n_ang):
    u, b1, b2, s, w = make_inputs(11, n_ang, 15, torch.float32, device)
    out = angle_basis(u, b1, b2, s, w)
    ref = F.angle_basis(u, b1, b2, s, w)
    assert out.shape == (n_ang, 31) and out.dtype == torch.float32
    if n_ang == 0:
        return
    # against float64 truth on the same float32 inputs: a few ulp of the dot product, amplified
    # by d theta / d cos = 1 / sin(theta) and by w_k, plus the rounding of w_k theta
    truth = F.angle_basis(u.double(), b1, b2, s.double(), w.double())
    cc = (u.double()[b1] * u.double()[b2]).sum(1) * s.double() * (1 - 1e-6)
    sin_t = torch.sqrt(1 - cc * cc)
    bound = 1e-5 + 8 * torch.finfo(torch.float32).eps * w.abs().max().double() / sin_t / math.sqrt(
        math.pi)
    assert ((ref.double() - truth).abs() <= bound[:, None]).all()  # the bound holds for torch
    assert ((out.double() - truth).abs() <= bound[:, None]).all()
    # well-conditioned angles agree with the reference directly (~1 ulp of theta times w_k)
    well = sin_t > 0.1
    torch.testing.assert_close(out[well], ref[well], rtol=0, atol=1e-5)


def test_forward_k_not_power_of_two_and_noncontiguous():
    u, b1, b2, s, w = make_inputs(9, 13, 3, torch.float64, "cpu", seed=3)
    u_nc = torch.cat([u, u], dim=1)[:, :3]  # strided rows
    b1_nc = torch.stack([b1, b2], dim=1)[:, 0]
    out = angle_basis(u_nc, b1_nc, b2, s, w)
    torch.testing.assert_close(out, F.angle_basis(u, b1, b2, s, w), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# first order


def _first_order(fn, u, b1, b2, s, w, gout):
    uu, ww = _leaf(u), _leaf(w)
    out = fn(uu, b1, b2, s, ww)
    gu, gw = torch.autograd.grad(out, (uu, ww), gout)
    return gu, gw


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_ang", [1, 7, 129])
def test_grad_float64(device, n_ang):
    u, b1, b2, s, w = make_inputs(11, n_ang, 15, torch.float64, device, seed=n_ang)
    gout = torch.randn(n_ang, 31, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gout = gout.to(device)
    gu, gw = _first_order(angle_basis, u, b1, b2, s, w, gout)
    ru, rw = _first_order(F.angle_basis, u, b1, b2, s, w, gout)
    # the (0, 0) pairs have d theta / d cos ~ 1/sqrt(2e-6) ~ 700: scale the tolerance
    torch.testing.assert_close(gu, ru, rtol=1e-10, atol=1e-10 * ru.abs().max().item())
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-10 * rw.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_grad_float32(device):
    # no extreme angles: their float32 derivatives are dominated by rounding (reference too)
    u, b1, b2, s, w = make_inputs(11, 129, 15, torch.float32, device, seed=5, extreme=False,
                                  self_pair=False)
    gout = torch.randn(129, 31, generator=torch.Generator().manual_seed(2)).to(device)
    gu, gw = _first_order(angle_basis, u, b1, b2, s, w, gout)
    ru, rw = _first_order(F.angle_basis, u, b1, b2, s, w, gout)
    torch.testing.assert_close(gu, ru, rtol=1e-4, atol=1e-4 * ru.abs().max().item())
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-4 * rw.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_grad_expanded_upstream_and_empty(device):
    # out.sum().backward() hands the backward a stride-0 expanded gradient
    u, b1, b2, s, w = make_inputs(11, 7, 15, torch.float64, device, seed=7)
    uu, ww = _leaf(u), _leaf(w)
    angle_basis(uu, b1, b2, s, ww).sum().backward()
    ru, rw = _leaf(u), _leaf(w)
    F.angle_basis(ru, b1, b2, s, rw).sum().backward()
    tol = 1e-10 * ru.grad.abs().max().item()
    torch.testing.assert_close(uu.grad, ru.grad, rtol=1e-10, atol=tol)
    torch.testing.assert_close(ww.grad, rw.grad, rtol=1e-10, atol=1e-12)
    # no angles: zero gradients of the right shapes
    u, b1, b2, s, w = make_inputs(4, 0, 15, torch.float64, device)
    uu, ww = _leaf(u), _leaf(w)
    out = angle_basis(uu, b1, b2, s, ww)
    assert out.shape == (0, 31)
    gu, gw = torch.autograd.grad(out.sum(), (uu, ww))
    assert torch.equal(gu, torch.zeros_like(u)) and torch.equal(gw, torch.zeros_like(w))


# ------------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck (float64, finite differences: keep |cos| away from 1)


@pytest.mark.parametrize("n_freq,n_ang", [(3, 5), (15, 3)])
def test_gradcheck(n_freq, n_ang):
    u, b1, b2, s, w = make_inputs(6, n_ang, n_freq, torch.float64, "cpu", seed=11, margin=0.05,
                                  self_pair=False)
    uu, ww = _leaf(u), _leaf(w)

    def fn(unit, freq):
        return angle_basis(unit, b1, b2, s, freq)

    assert torch.autograd.gradcheck(fn, (uu, ww))
    assert torch.autograd.gradgradcheck(fn, (uu, ww))


# ------------------------------------------------------------------------------------------------
# second order against the reference (the force-in-the-loss pattern)


def _second_order(fn, u, b1, b2, s, w, c, v):
    uu, ww = _leaf(u), _leaf(w)
    out = fn(uu, b1, b2, s, ww)
    # "forces" (and the frequency gradient, to exercise both incoming second-order gradients)
    gu, gw = torch.autograd.grad((out * c).sum(), (uu, ww), create_graph=True)
    loss = (gu * v).sum() + gu.pow(2).sum() + (gw * torch.arange(len(gw)).to(gw)).sum()
    return torch.autograd.grad(loss, (uu, ww))


@pytest.mark.parametrize("device", DEVICES)
def test_second_order_matches_reference(device):
    u, b1, b2, s, w = make_inputs(11, 40, 15, torch.float64, device, seed=13, margin=1e-3)
    g = torch.Generator().manual_seed(3)
    c = torch.randn(40, 31, generator=g, dtype=torch.float64).to(device)
    v = torch.randn(11, 3, generator=g, dtype=torch.float64).to(device)
    ours = _second_order(angle_basis, u, b1, b2, s, w, c, v)
    ref = _second_order(F.angle_basis, u, b1, b2, s, w, c, v)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9 * r.abs().max().item())


def test_third_order_matches_reference():
    # the backward op's autograd formula is plain torch: higher orders follow
    u, b1, b2, s, w = make_inputs(5, 6, 3, torch.float64, "cpu", seed=17, margin=0.1,
                                  self_pair=False)

    def third(fn):
        uu, ww = _leaf(u), _leaf(w)
        (gu,) = torch.autograd.grad(fn(uu, b1, b2, s, ww).sin().sum(), uu, create_graph=True)
        (gw,) = torch.autograd.grad(gu.pow(2).sum(), ww, create_graph=True)
        return torch.autograd.grad(gw.pow(2).sum(), (uu, ww))

    for a, r in zip(third(angle_basis), third(F.angle_basis)):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9 * r.abs().max().item())


# ------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("device", DEVICES)
def test_compile_no_graph_break(device):
    u, b1, b2, s, w = make_inputs(11, 7, 15, torch.float64, device, seed=19)

    def fn(unit, freq):
        return (angle_basis(unit, b1, b2, s, freq).sin() * 1.5).sum()

    try:
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        uu, ww = _leaf(u), _leaf(w)
        val = compiled(uu, ww)
        val.backward()
    except Exception as exc:  # noqa: BLE001
        if "graph break" in str(exc).lower() or "Unsupported" in type(exc).__name__:
            raise
        pytest.skip(f"torch.compile unavailable here: {type(exc).__name__}: {exc}")
    ru, rw = _leaf(u), _leaf(w)
    ref = fn(ru, rw)
    ref.backward()
    torch.testing.assert_close(val, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(uu.grad, ru.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ww.grad, rw.grad, rtol=1e-12, atol=1e-12)
