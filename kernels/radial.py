"""Fused radial Bessel bases of CHGNet: both cutoffs (atom graph, bond graph) in one pass.

Contract: :func:`fastchgnet.nn.functional.radial_bases`. For bond lengths ``r`` (n,) and learnable
frequencies ``w`` (K,) of a cutoff ``rc``::

    basis[i, k] = sqrt(2 / rc) * sin(w_k x_i) / r_i * env(x_i),   x_i = r_i / rc

with ``env(x) = 1 + x^p (a + x (b + c x))`` for ``x < 1``, 0 otherwise (``p = 0``: no envelope,
``env = 1`` everywhere, as in the reference). Writing ``B(r) = sqrt(2/rc) env(r/rc) / r``, the
derivatives the backward kernel needs are::

    d basis / dr = cos(w x) (w / rc) B + sin(w x) B'
    d basis / dw = cos(w x) x B                    B' = sqrt(2/rc) (env'(x) / (rc r) - env / r^2)

One program handles ``BLOCK_N`` rows and all K columns (padded to a power of two with masks); the
forward writes both (n, K) bases, the backward writes ``grad_r`` (n,) and, per program, column
partial sums of ``grad_freq`` into a (programs, BLOCK_K) buffer that torch then sums
(deterministic: no atomics).

Second derivatives (training puts forces ``dE/dr`` into the loss) go through the backward op's own
autograd formula, written analytically in plain torch (:func:`_backward_backward`), so every
higher order is differentiable too.

Scalars: Triton passes Python floats as fp32. So that float64 runs keep full precision for any
cutoff, each cutoff and normalisation constant is passed as an fp32 pair ``hi + lo`` (about 48
significant bits) and recombined in the tensors' dtype inside the kernel.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastchgnet.kernels._registry import kernel_op, launch

__all__ = ["radial_bases", "radial_bases_backward", "radial_bases_op"]

# Tile sizes. Rows per program: 64 rows x 32 padded columns (K = 31 for CHGNet 0.3.0) = 2048
# elements per program in the forward (16 per thread with the default 4 warps), a usual size for
# a memory-bound elementwise kernel that still leaves thousands of programs for a batch's
# ~10^5 bonds. The backward takes 128 rows per program to halve the (programs, K) partial-sum
# buffer; its per-thread work stays the same order. Chosen by these rules of thumb, not measured:
# no GPU was available when this kernel was written (re-tune on one if it shows in a profile).
FWD_BLOCK_N = 64
BWD_BLOCK_N = 128


# ------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _envelope(x, P: tl.constexpr):
    """``(env(x), env'(x))``; zero for ``x >= 1``; ``P == 0``: ``(1, 0)`` everywhere."""
    if P == 0:
        env = x * 0.0 + 1.0
        denv = x * 0.0
    else:
        A = -(P + 1) * (P + 2) / 2
        B = P * (P + 2) * 1.0
        C = -P * (P + 1) / 2
        xpm1 = x * 0.0 + 1.0  # x^(p-1)
        for _ in tl.static_range(P - 1):
            xpm1 = xpm1 * x
        inside = x < 1.0
        env = tl.where(inside, 1.0 + (xpm1 * x) * (A + x * (B + C * x)), 0.0)
        denv = tl.where(inside, xpm1 * (P * A + x * ((P + 1) * B + (P + 2) * C * x)), 0.0)
    return env, denv


@triton.jit
def _scaled(r, rc_hi, rc_lo, nm_hi, nm_lo, P: tl.constexpr):
    """Cutoff and normalisation rebuilt in r's dtype from their float32 (hi, lo) pairs, the scaled
    length x = r / rc, and the envelope with its derivative at x."""
    zero = r * 0.0
    rc = (zero + rc_hi) + rc_lo
    norm = (zero + nm_hi) + nm_lo
    x = r / rc
    env, denv = _envelope(x, P)
    return rc, norm, x, env, denv


@triton.jit
def _fwd_one(r, rows64, rmask, cols, f_ptr, out_ptr, K, rc_hi, rc_lo, nm_hi, nm_lo,
             P: tl.constexpr):
    rc, norm, x, env, _ = _scaled(r, rc_hi, rc_lo, nm_hi, nm_lo, P)
    scale = norm * env / r
    cmask = cols < K
    f = tl.load(f_ptr + cols, mask=cmask, other=0.0)
    basis = tl.sin(f[None, :] * x[:, None]) * scale[:, None]
    offs = rows64[:, None] * K + cols[None, :]
    tl.store(out_ptr + offs, basis, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _radial_fwd_kernel(r_ptr, fa_ptr, fb_ptr, outa_ptr, outb_ptr, n, Ka, Kb,
                       rca_hi, rca_lo, rcb_hi, rcb_lo, nma_hi, nma_lo, nmb_hi, nmb_lo,
                       P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    r = tl.load(r_ptr + rows64, mask=rmask, other=1.0)
    _fwd_one(r, rows64, rmask, cols, fa_ptr, outa_ptr, Ka, rca_hi, rca_lo, nma_hi, nma_lo, P)
    _fwd_one(r, rows64, rmask, cols, fb_ptr, outb_ptr, Kb, rcb_hi, rcb_lo, nmb_hi, nmb_lo, P)


@triton.jit
def _bwd_one(r, rows64, rmask, cols, f_ptr, g_ptr, K, rc_hi, rc_lo, nm_hi, nm_lo,
             P: tl.constexpr):
    """(per-row d/dr contribution (BLOCK_N,), per-column d/dw partial sum (BLOCK_K,))."""
    rc, norm, x, env, denv = _scaled(r, rc_hi, rc_lo, nm_hi, nm_lo, P)
    b0 = norm * env / r
    b1 = norm * (denv / (rc * r) - env / (r * r))
    cmask = cols < K
    f = tl.load(f_ptr + cols, mask=cmask, other=0.0)
    g = tl.load(g_ptr + rows64[:, None] * K + cols[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0)
    u = f[None, :] * x[:, None]
    gc = g * tl.cos(u)
    gs = g * tl.sin(u)
    d_r = tl.sum(gc * f[None, :], axis=1) * (b0 / rc) + tl.sum(gs, axis=1) * b1
    d_f = tl.sum(gc * (x * b0)[:, None], axis=0)
    return d_r, d_f


@triton.jit
def _radial_bwd_kernel(r_ptr, fa_ptr, fb_ptr, ga_ptr, gb_ptr, gr_ptr, pfa_ptr, pfb_ptr,
                       n, Ka, Kb,
                       rca_hi, rca_lo, rcb_hi, rcb_lo, nma_hi, nma_lo, nmb_hi, nmb_lo,
                       P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    # padded rows: r = 1 keeps every term finite; their zero gradient rows then add nothing
    r = tl.load(r_ptr + rows64, mask=rmask, other=1.0)
    dra, dfa = _bwd_one(r, rows64, rmask, cols, fa_ptr, ga_ptr, Ka,
                        rca_hi, rca_lo, nma_hi, nma_lo, P)
    drb, dfb = _bwd_one(r, rows64, rmask, cols, fb_ptr, gb_ptr, Kb,
                        rcb_hi, rcb_lo, nmb_hi, nmb_lo, P)
    tl.store(gr_ptr + rows64, dra + drb, mask=rmask)
    part = pid.to(tl.int64) * BLOCK_K + cols
    tl.store(pfa_ptr + part, dfa)
    tl.store(pfb_ptr + part, dfb)


# ------------------------------------------------------------------------------------------------
# launchers (torch.library ops)


def _split(v: float) -> tuple[float, float]:
    """``v ~= hi + lo`` with both exactly representable in fp32 (about 48 significant bits)."""
    hi = struct.unpack("f", struct.pack("f", v))[0]
    lo = struct.unpack("f", struct.pack("f", v - hi))[0]
    return hi, lo


def _scalars(cutoff_a: float, cutoff_b: float) -> tuple[float, ...]:
    return (*_split(cutoff_a), *_split(cutoff_b),
            *_split(math.sqrt(2.0 / cutoff_a)), *_split(math.sqrt(2.0 / cutoff_b)))


def _block_k(ka, kb) -> int:
    # int(): K is a compile-time constant of the kernel (specialised on when shapes are symbolic)
    return max(triton.next_power_of_2(int(max(ka, kb))), 2)


@kernel_op("fastchgnet::radial_bases")
def radial_bases_op(r: Tensor, freq_a: Tensor, freq_b: Tensor, cutoff_a: float, cutoff_b: float,
                    p: int) -> tuple[Tensor, Tensor]:
    """Launcher of the forward kernel: ``(basis_a, basis_b)``, (n, Ka) and (n, Kb)."""
    r = r.contiguous()
    freq_a = freq_a.contiguous()
    freq_b = freq_b.contiguous()
    n, ka, kb = r.shape[0], freq_a.shape[0], freq_b.shape[0]
    out_a = r.new_empty((n, ka))
    out_b = r.new_empty((n, kb))
    if n == 0:
        return out_a, out_b
    grid = (triton.cdiv(n, FWD_BLOCK_N),)
    launch(_radial_fwd_kernel)[grid](
        r, freq_a, freq_b, out_a, out_b, n, ka, kb, *_scalars(cutoff_a, cutoff_b),
        P=int(p), BLOCK_N=FWD_BLOCK_N, BLOCK_K=_block_k(ka, kb))
    return out_a, out_b


@radial_bases_op.register_fake
def _(r, freq_a, freq_b, cutoff_a, cutoff_b, p):
    n = r.shape[0]
    return r.new_empty((n, freq_a.shape[0])), r.new_empty((n, freq_b.shape[0]))


@kernel_op("fastchgnet::radial_bases_backward")
def radial_bases_backward(grad_a: Tensor, grad_b: Tensor, r: Tensor, freq_a: Tensor,
                          freq_b: Tensor, cutoff_a: float, cutoff_b: float,
                          p: int) -> tuple[Tensor, Tensor, Tensor]:
    """Launcher of the backward kernel: ``(grad_r, grad_freq_a, grad_freq_b)``."""
    grad_a = grad_a.contiguous()
    grad_b = grad_b.contiguous()
    r = r.contiguous()
    freq_a = freq_a.contiguous()
    freq_b = freq_b.contiguous()
    n, ka, kb = r.shape[0], freq_a.shape[0], freq_b.shape[0]
    grad_r = torch.empty_like(r)
    if n == 0:
        return grad_r, torch.zeros_like(freq_a), torch.zeros_like(freq_b)
    block_k = _block_k(ka, kb)
    programs = triton.cdiv(n, BWD_BLOCK_N)
    part_a = r.new_empty((programs, block_k))
    part_b = r.new_empty((programs, block_k))
    launch(_radial_bwd_kernel)[(programs,)](
        r, freq_a, freq_b, grad_a, grad_b, grad_r, part_a, part_b, n, ka, kb,
        *_scalars(cutoff_a, cutoff_b), P=int(p), BLOCK_N=BWD_BLOCK_N, BLOCK_K=block_k)
    return grad_r, part_a[:, :ka].sum(0), part_b[:, :kb].sum(0)


@radial_bases_backward.register_fake
def _(grad_a, grad_b, r, freq_a, freq_b, cutoff_a, cutoff_b, p):
    return torch.empty_like(r), torch.empty_like(freq_a), torch.empty_like(freq_b)


# ------------------------------------------------------------------------------------------------
# autograd


def _setup(ctx, inputs, output):
    r, freq_a, freq_b, cutoff_a, cutoff_b, p = inputs
    ctx.save_for_backward(r, freq_a, freq_b)
    ctx.consts = (cutoff_a, cutoff_b, p)


def _backward(ctx, grad_a, grad_b):
    r, freq_a, freq_b = ctx.saved_tensors
    n = r.shape[0]
    if grad_a is None:
        grad_a = r.new_zeros((n, freq_a.shape[0]))
    if grad_b is None:
        grad_b = r.new_zeros((n, freq_b.shape[0]))
    grad_r, grad_fa, grad_fb = radial_bases_backward(grad_a, grad_b, r, freq_a, freq_b,
                                                     *ctx.consts)
    return grad_r, grad_fa, grad_fb, None, None, None


radial_bases_op.register_autograd(_backward, setup_context=_setup)


def _terms(r: Tensor, w: Tensor, rc: float, p: int):
    """Plain-torch pieces of one basis (differentiable): ``x``, ``sin``, ``cos`` (n, K) of
    ``w x`` and ``B, B', B''`` (n,) where ``basis = sin(w x) B(r)``."""
    x = r / rc
    norm = math.sqrt(2.0 / rc)
    if p:
        a = -(p + 1) * (p + 2) / 2
        b = float(p * (p + 2))
        c = -p * (p + 1) / 2
        inside = x < 1
        zero = torch.zeros_like(x)
        env = torch.where(inside, 1 + x.pow(p) * (a + x * (b + c * x)), zero)
        d1 = torch.where(inside, x.pow(p - 1) * (p * a + x * ((p + 1) * b + (p + 2) * c * x)),
                         zero)
        d2 = (p + 1) * p * b * x.pow(p - 1) + (p + 2) * (p + 1) * c * x.pow(p)
        if p >= 2:
            d2 = d2 + p * (p - 1) * a * x.pow(p - 2)
        d2 = torch.where(inside, d2, zero)
    else:
        env = torch.ones_like(x)
        d1 = d2 = torch.zeros_like(x)
    b0 = norm * env / r
    b1 = norm * (d1 / (rc * r) - env / (r * r))
    b2 = norm * (d2 / (rc * rc * r) - 2 * d1 / (rc * r * r) + 2 * env / (r * r * r))
    u = w * x[:, None]
    return x, torch.sin(u), torch.cos(u), b0, b1, b2


def _vjp_vjp(r, w, g, h_r, h_w, rc, p):
    """One basis' contribution to the backward op's VJP: the backward computes
    ``grad_r = sum_k g dbasis/dr`` and ``grad_w = sum_i g dbasis/dw``; given their cotangents
    ``h_r`` (n,), ``h_w`` (K,) return the cotangents of ``g`` (n, K), ``r`` (n,), ``w`` (K,)."""
    x, s, c, b0, b1, b2 = _terms(r, w, rc, p)
    wr = w / rc                                    # (K,)
    xc = x[:, None]
    b0c, b1c, b2c = b0[:, None], b1[:, None], b2[:, None]
    d_r = c * wr * b0c + s * b1c                   # d basis / dr
    d_w = c * xc * b0c                             # d basis / dw
    d_rr = -s * wr * wr * b0c + 2 * c * wr * b1c + s * b2c
    d_rw = -s * wr * xc * b0c + c * b0c / rc + c * xc * b1c
    d_ww = -s * xc * xc * b0c
    hr = h_r[:, None]
    grad_g = hr * d_r + h_w * d_w
    grad_r = (g * (hr * d_rr + h_w * d_rw)).sum(1)
    grad_w = (g * (hr * d_rw + h_w * d_ww)).sum(0)
    return grad_g, grad_r, grad_w


def _setup_bwd(ctx, inputs, output):
    grad_a, grad_b, r, freq_a, freq_b, cutoff_a, cutoff_b, p = inputs
    ctx.save_for_backward(grad_a, grad_b, r, freq_a, freq_b)
    ctx.consts = (cutoff_a, cutoff_b, p)


def _backward_backward(ctx, h_r, h_fa, h_fb):
    grad_a, grad_b, r, freq_a, freq_b = ctx.saved_tensors
    cutoff_a, cutoff_b, p = ctx.consts
    if h_r is None:
        h_r = torch.zeros_like(r)
    if h_fa is None:
        h_fa = torch.zeros_like(freq_a)
    if h_fb is None:
        h_fb = torch.zeros_like(freq_b)
    gga, gra, gfa = _vjp_vjp(r, freq_a, grad_a, h_r, h_fa, cutoff_a, p)
    ggb, grb, gfb = _vjp_vjp(r, freq_b, grad_b, h_r, h_fb, cutoff_b, p)
    return gga, ggb, gra + grb, gfa, gfb, None, None, None


radial_bases_backward.register_autograd(_backward_backward, setup_context=_setup_bwd)


# ------------------------------------------------------------------------------------------------
# public function


def radial_bases(r: Tensor, freq_a: Tensor, freq_b: Tensor, cutoff_a: float, cutoff_b: float,
                 p: int) -> tuple[Tensor, Tensor]:
    """Both radial bases (Triton kernel); the contract of
    :func:`fastchgnet.nn.functional.radial_bases`."""
    dtype = torch.promote_types(torch.promote_types(r.dtype, freq_a.dtype), freq_b.dtype)
    r, freq_a, freq_b = r.to(dtype), freq_a.to(dtype), freq_b.to(dtype)
    return radial_bases_op(r, freq_a, freq_b, float(cutoff_a), float(cutoff_b), int(p))
