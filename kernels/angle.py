"""Fused Fourier angle basis (Triton): gather of the two legs, dot product, arccos and expansion.

Contract: :func:`fastchgnet.nn.functional.angle_basis`. Per angle ``a`` with legs ``b1[a]``,
``b2[a]`` (rows of ``unit``) and sign ``s[a] = +-1``::

    dot   = u[b1] . u[b2]
    cc    = dot * s * (1 - 1e-6)          # the factor keeps d arccos / d cc finite
    theta = arccos(cc)
    out   = [1/sqrt(2), sin(w_k theta), cos(w_k theta)] / sqrt(pi)        (A, 2 K + 1)

Kernels (one program per block of ``BLOCK_A`` angles, all ``K`` frequencies at once):

* ``_angle_fwd_kernel``: the whole forward; nothing but the output is written.
* ``_angle_bwd_kernel``: recomputes ``theta`` and, from ``grad_out``, writes per angle the two leg
  contributions ``d L / d dot * u[other leg]`` (a (2, A, 3) buffer) and per program the partial sum
  of ``d L / d freq`` (a (n_programs, K) buffer, reduced with ``torch.sum``: deterministic).

The gradient w.r.t. ``unit`` is then assembled in the backward launcher with two
``Tensor.index_add_`` calls (leg 1 rows, leg 2 rows) instead of atomics in the kernel: it keeps the
kernel free of atomics, and ``index_add_`` follows ``torch.use_deterministic_algorithms`` (on CUDA
its default path adds with atomics too, in no fixed order; the deterministic mode sorts instead).

``arccos`` is evaluated in the kernels (Triton has no portable ``acos``/``atan2`` in
``triton.language``): fdlibm's rational approximation in float64, Cephes' ``acosf`` polynomial in
float32, both with the half-angle reduction ``acos(x) = 2 asin(sqrt((1 - |x|) / 2))`` for
``|x| > 1/2``; accurate to a few ulp over [-1, 1].

Second order: the backward op's own autograd formula (``_angle_bwd_vjp``) is the analytic
vector-Jacobian product of the backward written in plain, differentiable torch ops, so derivatives
of any order exist (training puts forces, first derivatives, into the loss).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastchgnet.kernels._registry import kernel_op, launch

__all__ = ["angle_basis"]

# Tuning constants. BLOCK_A angles per program: with K = 15 (padded to 16 columns) one program
# holds a 64 x 16 tile, 8 elements per thread at 4 warps, enough independent sin/cos work per
# thread to hide the latency of the gathered leg loads while keeping registers low (the backward
# tile carries grad_out, sin, cos and theta). Chosen from that occupancy estimate, not measured:
# no GPU was available when this kernel was written; re-tune with fastchgnet.bench on a GPU.
BLOCK_A = 64
NUM_WARPS = 4

# clamp factor of the reference (python floats: rounded to the tensor dtype inside the kernels,
# exactly as torch rounds the python scalar of the reference)
_CLAMP = tl.constexpr(1.0 - 1e-6)
_INV_SQRT_PI = tl.constexpr(1.0 / math.sqrt(math.pi))
_CONST_COL = tl.constexpr(1.0 / math.sqrt(math.pi) / math.sqrt(2.0))
_PI = tl.constexpr(math.pi)
_PI_2 = tl.constexpr(math.pi / 2)


# ------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _acos(x, IS_F64: tl.constexpr):
    """arccos of x in [-1, 1], elementwise, in the dtype of x."""
    ax = tl.abs(x)
    small = ax < 0.5
    # |x| < 1/2: acos = pi/2 - asin(x); otherwise asin(a) with a = sqrt((1 - |x|) / 2) <= 1/2
    z = tl.where(small, x * x, (1.0 - ax) * 0.5)
    a = tl.where(small, x, tl.sqrt(z))
    if IS_F64:
        # fdlibm e_asin.c: asin(a) = a + a * R(a^2), R rational, |error| < 1 ulp
        p = z * (1.66666666666666657415e-01 + z * (-3.25565818622400915405e-01 + z * (
            2.01212532134862925881e-01 + z * (-4.00555345006794114027e-02 + z * (
                7.91534994289814532176e-04 + z * 3.47933107596021167570e-05)))))
        q = 1.0 + z * (-2.40339491173441421878e+00 + z * (2.02094576023350569471e+00 + z * (
            -6.88283971605453293030e-01 + z * 7.70381505559019352791e-02)))
        asn = a + a * (p / q)
    else:
        # Cephes asinf.c polynomial (no division: fp32 division is approximate on GPUs)
        p = (((4.2163199048e-2 * z + 2.4181311049e-2) * z + 4.5470025998e-2) * z
             + 7.4953002686e-2) * z + 1.6666752422e-1
        asn = a + a * (z * p)
    big = tl.where(x > 0, 2.0 * asn, _PI - 2.0 * asn)
    return tl.where(small, _PI_2 - asn, big)


@triton.jit
def _load_theta(unit_ptr, b1_ptr, b2_ptr, sign_ptr, rows, rmask, IS_F64: tl.constexpr):
    """Gather both legs of the angles ``rows``; return (p, q components, sign, cc, theta).

    Masked rows read leg 0 with zero vectors: cc = 0, theta = pi/2, all finite."""
    i1 = tl.load(b1_ptr + rows, mask=rmask, other=0).to(tl.int64) * 3
    i2 = tl.load(b2_ptr + rows, mask=rmask, other=0).to(tl.int64) * 3
    p0 = tl.load(unit_ptr + i1, mask=rmask, other=0.0)
    p1 = tl.load(unit_ptr + i1 + 1, mask=rmask, other=0.0)
    p2 = tl.load(unit_ptr + i1 + 2, mask=rmask, other=0.0)
    q0 = tl.load(unit_ptr + i2, mask=rmask, other=0.0)
    q1 = tl.load(unit_ptr + i2 + 1, mask=rmask, other=0.0)
    q2 = tl.load(unit_ptr + i2 + 2, mask=rmask, other=0.0)
    s = tl.load(sign_ptr + rows, mask=rmask, other=1.0)
    dot = p0 * q0 + p1 * q1 + p2 * q2
    cc = dot * s * _CLAMP
    theta = _acos(cc, IS_F64)
    return p0, p1, p2, q0, q1, q2, s, cc, theta


@triton.jit
def _angle_fwd_kernel(unit_ptr, b1_ptr, b2_ptr, sign_ptr, freq_ptr, out_ptr, A, K,
                      BLOCK_A: tl.constexpr, K_PAD: tl.constexpr, IS_F64: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    rmask = rows < A
    p0, p1, p2, q0, q1, q2, s, cc, theta = _load_theta(unit_ptr, b1_ptr, b2_ptr, sign_ptr, rows,
                                                       rmask, IS_F64)
    k = tl.arange(0, K_PAD)
    kmask = k < K
    w = tl.load(freq_ptr + k, mask=kmask, other=0.0)
    arg = theta[:, None] * w[None, :]
    width = 2 * K + 1
    base = out_ptr + rows * width
    tl.store(base, tl.zeros_like(theta) + _CONST_COL, mask=rmask)
    m2 = rmask[:, None] & kmask[None, :]
    ptr = base[:, None] + 1 + k[None, :]
    tl.store(ptr, tl.sin(arg) * _INV_SQRT_PI, mask=m2)
    tl.store(ptr + K, tl.cos(arg) * _INV_SQRT_PI, mask=m2)


@triton.jit
def _angle_bwd_kernel(grad_ptr, unit_ptr, b1_ptr, b2_ptr, sign_ptr, freq_ptr, contrib_ptr,
                      gfreq_ptr, A, K,
                      BLOCK_A: tl.constexpr, K_PAD: tl.constexpr, IS_F64: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    rmask = rows < A
    p0, p1, p2, q0, q1, q2, s, cc, theta = _load_theta(unit_ptr, b1_ptr, b2_ptr, sign_ptr, rows,
                                                       rmask, IS_F64)
    k = tl.arange(0, K_PAD)
    kmask = k < K
    w = tl.load(freq_ptr + k, mask=kmask, other=0.0)
    arg = theta[:, None] * w[None, :]
    m2 = rmask[:, None] & kmask[None, :]
    gptr = grad_ptr + rows[:, None] * (2 * K + 1) + 1 + k[None, :]
    gs = tl.load(gptr, mask=m2, other=0.0)
    gc = tl.load(gptr + K, mask=m2, other=0.0)
    # d L / d arg (up to the 1/sqrt(pi) factor); zero on masked rows and padded columns
    e = gs * tl.cos(arg) - gc * tl.sin(arg)
    # d L / d freq: this program's partial sum over its angles
    gw = tl.sum(e * theta[:, None], axis=0) * _INV_SQRT_PI
    tl.store(gfreq_ptr + pid.to(tl.int64) * K + k, gw, mask=kmask)
    # d L / d dot = d L / d theta * (-1 / sqrt(1 - cc^2)) * sign * clamp
    dtheta = tl.sum(e * w[None, :], axis=1) * _INV_SQRT_PI
    gdot = -dtheta / tl.sqrt(1.0 - cc * cc) * s * _CLAMP
    # leg 1 receives gdot * u[b2], leg 2 receives gdot * u[b1]
    c1 = contrib_ptr + rows * 3
    tl.store(c1, gdot * q0, mask=rmask)
    tl.store(c1 + 1, gdot * q1, mask=rmask)
    tl.store(c1 + 2, gdot * q2, mask=rmask)
    c2 = c1 + A * 3
    tl.store(c2, gdot * p0, mask=rmask)
    tl.store(c2 + 1, gdot * p1, mask=rmask)
    tl.store(c2 + 2, gdot * p2, mask=rmask)


# ------------------------------------------------------------------------------------------------
# launchers (torch.library ops)


def _k_pad(k: int) -> int:
    return max(triton.next_power_of_2(k), 2)


@kernel_op("fastchgnet::angle_basis")
def _angle_basis_op(unit: Tensor, b1: Tensor, b2: Tensor, sign: Tensor, freq: Tensor) -> Tensor:
    unit, b1, b2 = unit.contiguous(), b1.contiguous(), b2.contiguous()
    sign, freq = sign.contiguous(), freq.contiguous()
    n_ang, n_freq = b1.shape[0], freq.shape[0]
    out = torch.empty((n_ang, 2 * n_freq + 1), dtype=unit.dtype, device=unit.device)
    if n_ang > 0:
        grid = (triton.cdiv(n_ang, BLOCK_A),)
        launch(_angle_fwd_kernel)[grid](
            unit, b1, b2, sign, freq, out, n_ang, n_freq,
            BLOCK_A=BLOCK_A, K_PAD=_k_pad(int(n_freq)), IS_F64=unit.dtype == torch.float64,
            num_warps=NUM_WARPS)
    return out


@_angle_basis_op.register_fake
def _(unit, b1, b2, sign, freq):
    return unit.new_empty((b1.shape[0], 2 * freq.shape[0] + 1))


@kernel_op("fastchgnet::angle_basis_backward")
def _angle_basis_backward_op(grad_out: Tensor, unit: Tensor, b1: Tensor, b2: Tensor,
                             sign: Tensor, freq: Tensor) -> tuple[Tensor, Tensor]:
    grad_out, unit = grad_out.contiguous(), unit.contiguous()
    b1, b2, sign, freq = b1.contiguous(), b2.contiguous(), sign.contiguous(), freq.contiguous()
    n_ang, n_freq = b1.shape[0], freq.shape[0]
    grad_unit = torch.zeros_like(unit)
    if n_ang == 0:
        return grad_unit, torch.zeros_like(freq)
    n_prog = triton.cdiv(n_ang, BLOCK_A)
    contrib = torch.empty((2, n_ang, 3), dtype=unit.dtype, device=unit.device)
    partial = torch.empty((n_prog, n_freq), dtype=freq.dtype, device=unit.device)
    launch(_angle_bwd_kernel)[(n_prog,)](
        grad_out, unit, b1, b2, sign, freq, contrib, partial, n_ang, n_freq,
        BLOCK_A=BLOCK_A, K_PAD=_k_pad(int(n_freq)), IS_F64=unit.dtype == torch.float64,
        num_warps=NUM_WARPS)
    grad_unit.index_add_(0, b1, contrib[0])
    grad_unit.index_add_(0, b2, contrib[1])
    return grad_unit, partial.sum(0)


@_angle_basis_backward_op.register_fake
def _(grad_out, unit, b1, b2, sign, freq):
    return torch.empty_like(unit), torch.empty_like(freq)


# ------------------------------------------------------------------------------------------------
# autograd


def _fwd_setup(ctx, inputs, output):
    unit, b1, b2, sign, freq = inputs
    ctx.save_for_backward(unit, b1, b2, sign, freq)


def _fwd_backward(ctx, grad_out):
    unit, b1, b2, sign, freq = ctx.saved_tensors
    grad_unit, grad_freq = _angle_basis_backward_op(grad_out, unit, b1, b2, sign, freq)
    return grad_unit, None, None, None, grad_freq


_angle_basis_op.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def _angle_bwd_vjp(grad_out: Tensor, unit: Tensor, b1: Tensor, b2: Tensor, sign: Tensor,
                   freq: Tensor, gg_unit: Tensor | None, gg_freq: Tensor | None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Analytic VJP of the backward op, in plain (differentiable) torch ops.

    With ``E = Gs cos(arg) - Gc sin(arg)``, ``T = E w / sqrt(pi)`` (= dL/dtheta), ``D = -s c r``
    (``r = 1/sqrt(1 - cc^2)``, ``c`` the clamp factor), the backward op computes
    ``gdot = T D`` (scattered as ``gdot q -> b1``, ``gdot p -> b2``) and
    ``grad_freq = sum_a theta E / sqrt(pi)``. For the scalar
    ``Phi = <gg_unit, grad_unit> + <gg_freq, grad_freq>``, with ``h = gg[b1].q + gg[b2].p``,
    ``J = (h D w + theta gg_freq) / sqrt(pi)`` and ``E' = -Gs sin(arg) - Gc cos(arg)``:

    * ``dPhi/dGs = J cos(arg)``, ``dPhi/dGc = -J sin(arg)``, zero for the constant column;
    * ``dPhi/dw = sum_a (h D E / sqrt(pi) + theta E' J)``;
    * ``dPhi/dtheta = (E' J) w + (E gg_freq) / sqrt(pi)``, then
      ``dPhi/dcc = -r dPhi/dtheta - T h s c cc r^3`` and ``dPhi/ddot = s c dPhi/dcc``;
    * ``dPhi/dp = gdot gg[b2] + dPhi/ddot q``, ``dPhi/dq = gdot gg[b1] + dPhi/ddot p``.

    Returns (grad w.r.t. grad_out, unit, freq).
    """
    inv = 1.0 / math.sqrt(math.pi)
    clamp = 1.0 - 1e-6
    n_freq = freq.shape[0]
    p, q = unit.index_select(0, b1), unit.index_select(0, b2)
    cc = (p * q).sum(dim=1) * sign * clamp
    theta = torch.acos(cc)
    r = torch.rsqrt(1 - cc * cc)
    arg = theta[:, None] * freq
    sin, cos = torch.sin(arg), torch.cos(arg)
    gs, gc = grad_out[:, 1:1 + n_freq], grad_out[:, 1 + n_freq:]
    e = gs * cos - gc * sin
    de = -gs * sin - gc * cos
    t = (e * freq).sum(dim=1) * inv
    d = -(sign * clamp) * r
    gdot = t * d
    if gg_unit is not None:
        gg1, gg2 = gg_unit.index_select(0, b1), gg_unit.index_select(0, b2)
        h = (gg1 * q).sum(dim=1) + (gg2 * p).sum(dim=1)
        hd = h * d
    else:
        h = hd = torch.zeros_like(theta)
    jw = hd[:, None] * freq
    if gg_freq is not None:
        jw = jw + theta[:, None] * gg_freq
    j = jw * inv
    d_grad = torch.cat([torch.zeros_like(theta[:, None]), j * cos, -j * sin], dim=1)
    d_freq = (hd[:, None] * e).sum(dim=0) * inv + (theta[:, None] * de * j).sum(dim=0)
    d_theta = (de * j * freq).sum(dim=1)
    if gg_freq is not None:
        d_theta = d_theta + (e * gg_freq).sum(dim=1) * inv
    d_cc = -r * d_theta - t * h * (sign * clamp) * cc * r * r * r
    d_dot = (sign * clamp) * d_cc
    d_p = d_dot[:, None] * q
    d_q = d_dot[:, None] * p
    if gg_unit is not None:
        d_p = d_p + gdot[:, None] * gg2
        d_q = d_q + gdot[:, None] * gg1
    d_unit = torch.zeros_like(unit).index_add(0, b1, d_p).index_add(0, b2, d_q)
    return d_grad, d_unit, d_freq


def _bwd_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _bwd_backward(ctx, gg_unit, gg_freq):
    grad_out, unit, b1, b2, sign, freq = ctx.saved_tensors
    d_grad, d_unit, d_freq = _angle_bwd_vjp(grad_out, unit, b1, b2, sign, freq, gg_unit, gg_freq)
    return d_grad, d_unit, None, None, None, d_freq


_angle_basis_backward_op.register_autograd(_bwd_backward, setup_context=_bwd_setup)


# ------------------------------------------------------------------------------------------------
# public function


def angle_basis(unit: Tensor, b1: Tensor, b2: Tensor, sign: Tensor, freq: Tensor) -> Tensor:
    """Fused :func:`fastchgnet.nn.functional.angle_basis` (same signature, values and derivatives
    of every order): (A, 2 K + 1) Fourier basis of the angles between legs ``b1`` and ``b2``."""
    return _angle_basis_op(unit, b1, b2, sign, freq)
