"""Fused GatedMLP epilogue: ``silu(LN(core)) * sigmoid(LN(gate)) [* weight]`` in one kernel.

Contract: :func:`fastchgnet.nn.functional.gated_epilogue` (values and all first and second
derivatives). Layout follows Liger-Kernel's SwiGLU / LayerNorm kernels:

* ``_gated_fwd_kernel``: one program per block of ``BLOCK_ROWS`` rows holding all ``d`` columns
  (padded to a power of two and masked). Both LayerNorms, one sigmoid per half (SiLU reuses the
  core's sigmoid: ``silu(y) = y * sigmoid(y)``), the product and the optional weight row all stay
  in registers. Saves ``stats`` (4, n) = (mean, rstd) of the core and of the gate per row.
* ``_gated_bwd_kernel``: a fixed grid of at most ``_MAX_BWD_PROGRAMS`` programs, each looping over
  row blocks. It recomputes the normalised values from ``stats``, writes ``grad_core`` and
  ``grad_gate``, keeps per-program partial sums of the four LayerNorm parameter gradients
  (reduced afterwards with ``torch.sum``: deterministic, no atomics), and, with a weight, writes the
  per-row products ``grad_out * y`` that ``torch.sum`` folds onto weight row ``i % m``.

Registration (:mod:`fastchgnet.kernels._registry`): ops ``fastchgnet::gated_epilogue`` and
``fastchgnet::gated_epilogue_backward``, both with fake implementations. The forward op's autograd
formula calls the backward op; the backward op's autograd formula is written with differentiable
plain-torch ops (the vector-Jacobian product of the reference, differentiated once more), so
double backward (forces in a training loss) and higher orders work. The plain-torch math is the
package's own copy of the reference, :func:`fastchgnet.kernels._torch_math.gated_epilogue`: the
kernels import nothing from :mod:`fastchgnet.nn`.

Optional weight: custom ops need a fixed signature, so "no weight" is passed as an **empty 1-D
sentinel tensor** (``core.new_empty(0)``; a real weight is always 2-D (m, d)). One op pair serves
both cases; the kernels branch on the ``HAS_WEIGHT`` constexpr, and the backward op then returns an
empty 1-D ``grad_weight`` that the autograd formula turns into ``None``.
"""

# no ``from __future__ import annotations``: torch.library infers the op schemas from the
# launchers' (evaluated) annotations
import struct
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastchgnet.kernels._env import interpreting
from fastchgnet.kernels._registry import kernel_op, launch
from fastchgnet.kernels._torch_math import gated_epilogue as _torch_gated_epilogue

__all__ = ["gated_epilogue"]

# ------------------------------------------------------------------------------------------------
# tuning constants
#
# No GPU was available to time them, so they were chosen from ptxas register reports (Triton 3.9,
# sm_90, both kernels, float32/float64, d = 64 and 256): a tile of _TILE_ELEMS = 1024 elements on
# 8 warps (4 elements a thread per tensor: 128-bit float32 loads; 16 rows a program at CHGNet's
# d = 64, 4 rows at d = 256) uses <= 64 registers (forward) / 80 (backward) in float32 and 112 / 128
# in float64, with no spills. 2048-element tiles on 4 warps hit 255 registers and spilled. The
# backward reduces the parameter gradients of each tile to (d,) accumulators (2-D accumulators
# cost ~30 more registers). _MAX_BWD_PROGRAMS bounds the backward's partial-sum buffer to
# (4, 1024, d) while leaving several programs per SM (H100: 132 SMs); each program loops over
# row blocks. Re-tune on the target GPU.
_TILE_ELEMS = 1024
_NUM_WARPS = 8
_MAX_BWD_PROGRAMS = 1024
# Largest feature width handled by the kernel (one row lives in registers); wider falls back.
_MAX_D = 256
# kernels are interpreted when TRITON_INTERPRET is set at import (as triton.jit decides)
_INTERPRETED = interpreting()


def _block_sizes(d: int) -> Tuple[int, int]:
    block_d = triton.next_power_of_2(d)
    return max(1, _TILE_ELEMS // block_d), block_d


def _split_eps(eps: float) -> Tuple[float, float]:
    """``eps`` as a float32 head and a tail: Triton passes Python floats as float32, so the kernel
    adds both parts to stay exact in float64 (the tail is below float32 resolution there)."""
    hi = struct.unpack("f", struct.pack("f", eps))[0]
    return hi, float(eps - hi)


def _interpreted_tiles(tiles_per_prog: int) -> int:
    """The backward's ``TILES``: its loop count as a constant under Triton's interpreter, else 0
    (compiled: a runtime argument, no recompilation per batch size). Triton 3.6's interpreter
    cannot loop over a runtime scalar with numpy >= 2.4 (``int()`` of a 1-element array)."""
    return tiles_per_prog if _INTERPRETED else 0


# ------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _gated_fwd_kernel(core_ptr, gate_ptr, wc_ptr, bc_ptr, wg_ptr, bg_ptr, weight_ptr,
                      out_ptr, stats_ptr,
                      n_rows, n_cols, m_rows, eps_hi, eps_lo,
                      HAS_WEIGHT: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    cmask = cols < n_cols
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * n_cols + cols[None, :]

    x = tl.load(core_ptr + offs, mask=mask, other=0.0)
    z = tl.load(gate_ptr + offs, mask=mask, other=0.0)
    wc = tl.load(wc_ptr + cols, mask=cmask, other=0.0)
    bc = tl.load(bc_ptr + cols, mask=cmask, other=0.0)
    wg = tl.load(wg_ptr + cols, mask=cmask, other=0.0)
    bg = tl.load(bg_ptr + cols, mask=cmask, other=0.0)

    # LayerNorm of the core (biased variance, like torch)
    mean_c = tl.sum(x, axis=1) / n_cols
    xc = tl.where(mask, x - mean_c[:, None], 0.0)
    rstd_c = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / n_cols + eps_hi + eps_lo)
    yc = xc * rstd_c[:, None] * wc[None, :] + bc[None, :]
    # LayerNorm of the gate
    mean_g = tl.sum(z, axis=1) / n_cols
    zc = tl.where(mask, z - mean_g[:, None], 0.0)
    rstd_g = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=1) / n_cols + eps_hi + eps_lo)
    yg = zc * rstd_g[:, None] * wg[None, :] + bg[None, :]

    # silu(yc) * sigmoid(yg): one sigmoid per half
    out = yc * tl.sigmoid(yc) * tl.sigmoid(yg)
    if HAS_WEIGHT:
        wrow = rows % m_rows
        w = tl.load(weight_ptr + wrow[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
        out = out * w
    tl.store(out_ptr + offs, out, mask=mask)

    tl.store(stats_ptr + rows, mean_c, mask=rmask)
    tl.store(stats_ptr + n_rows + rows, rstd_c, mask=rmask)
    tl.store(stats_ptr + 2 * n_rows + rows, mean_g, mask=rmask)
    tl.store(stats_ptr + 3 * n_rows + rows, rstd_g, mask=rmask)


@triton.jit
def _gated_bwd_kernel(dout_ptr, core_ptr, gate_ptr, wc_ptr, bc_ptr, wg_ptr, bg_ptr, weight_ptr,
                      stats_ptr, dcore_ptr, dgate_ptr, dwrows_ptr, partial_ptr,
                      n_rows, n_cols, m_rows, tiles_per_prog,
                      HAS_WEIGHT: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                      TILES: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < n_cols
    wc = tl.load(wc_ptr + cols, mask=cmask, other=0.0)
    bc = tl.load(bc_ptr + cols, mask=cmask, other=0.0)
    wg = tl.load(wg_ptr + cols, mask=cmask, other=0.0)
    bg = tl.load(bg_ptr + cols, mask=cmask, other=0.0)

    acc_dtype = partial_ptr.dtype.element_ty
    acc_wc = tl.zeros([BLOCK_D], dtype=acc_dtype)
    acc_bc = tl.zeros([BLOCK_D], dtype=acc_dtype)
    acc_wg = tl.zeros([BLOCK_D], dtype=acc_dtype)
    acc_bg = tl.zeros([BLOCK_D], dtype=acc_dtype)

    # TILES > 0 (interpreter only, see _interpreted_tiles): the loop count as a constant;
    # compiled kernels get TILES = 0 and loop over the runtime tiles_per_prog
    for t in range(0, TILES if TILES > 0 else tiles_per_prog):
        tile = pid + t * nprog
        rows = tile.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        rmask = rows < n_rows
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * n_cols + cols[None, :]

        go = tl.load(dout_ptr + offs, mask=mask, other=0.0)
        x = tl.load(core_ptr + offs, mask=mask, other=0.0)
        z = tl.load(gate_ptr + offs, mask=mask, other=0.0)
        mean_c = tl.load(stats_ptr + rows, mask=rmask, other=0.0)
        rstd_c = tl.load(stats_ptr + n_rows + rows, mask=rmask, other=0.0)
        mean_g = tl.load(stats_ptr + 2 * n_rows + rows, mask=rmask, other=0.0)
        rstd_g = tl.load(stats_ptr + 3 * n_rows + rows, mask=rmask, other=0.0)

        xh = tl.where(mask, (x - mean_c[:, None]) * rstd_c[:, None], 0.0)
        zh = tl.where(mask, (z - mean_g[:, None]) * rstd_g[:, None], 0.0)
        yc = xh * wc[None, :] + bc[None, :]
        yg = zh * wg[None, :] + bg[None, :]
        sc = tl.sigmoid(yc)
        sg = tl.sigmoid(yg)
        silu = yc * sc

        if HAS_WEIGHT:
            w = tl.load(weight_ptr + (rows % m_rows)[:, None] * n_cols + cols[None, :],
                        mask=mask, other=0.0)
            tl.store(dwrows_ptr + offs, go * silu * sg, mask=mask)
            g = go * w
        else:
            g = go
        # padded rows / columns: go = 0 there, so every gradient below is 0 too
        dyc = g * sg * (sc * (1.0 + yc * (1.0 - sc)))
        dyg = g * silu * (sg * (1.0 - sg))

        acc_wc += tl.sum(dyc * xh, axis=0)
        acc_bc += tl.sum(dyc, axis=0)
        acc_wg += tl.sum(dyg * zh, axis=0)
        acc_bg += tl.sum(dyg, axis=0)

        # LayerNorm input gradient: rstd * (dxh - mean(dxh) - xh * mean(dxh * xh))
        dxh = dyc * wc[None, :]
        c1 = tl.sum(dxh * xh, axis=1) / n_cols
        c2 = tl.sum(dxh, axis=1) / n_cols
        dx = (dxh - xh * c1[:, None] - c2[:, None]) * rstd_c[:, None]
        tl.store(dcore_ptr + offs, dx, mask=mask)
        dzh = dyg * wg[None, :]
        c1 = tl.sum(dzh * zh, axis=1) / n_cols
        c2 = tl.sum(dzh, axis=1) / n_cols
        dz = (dzh - zh * c1[:, None] - c2[:, None]) * rstd_g[:, None]
        tl.store(dgate_ptr + offs, dz, mask=mask)

    # partial sums: partial[k, pid, :] for k = w_core, b_core, w_gate, b_gate
    base = partial_ptr + pid * n_cols + cols
    stride = nprog * n_cols
    tl.store(base, acc_wc, mask=cmask)
    tl.store(base + stride, acc_bc, mask=cmask)
    tl.store(base + 2 * stride, acc_wg, mask=cmask)
    tl.store(base + 3 * stride, acc_bg, mask=cmask)


# ------------------------------------------------------------------------------------------------
# ops


@kernel_op("fastchgnet::gated_epilogue")
def _gated_fwd(core: Tensor, gate: Tensor, w_core: Tensor, b_core: Tensor, w_gate: Tensor,
               b_gate: Tensor, weight: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """(out (n, d), stats (4, n)); ``weight`` (m, d) or the empty 1-D sentinel."""
    core, gate = core.contiguous(), gate.contiguous()
    w_core, b_core = w_core.contiguous(), b_core.contiguous()
    w_gate, b_gate = w_gate.contiguous(), b_gate.contiguous()
    weight = weight.contiguous()
    n, d = core.shape
    has_weight = weight.dim() == 2
    m = weight.shape[0] if has_weight else 1
    out = torch.empty_like(core)
    stats = core.new_empty((4, n))
    if n > 0:
        block_rows, block_d = _block_sizes(d)
        eps_hi, eps_lo = _split_eps(eps)
        grid = (triton.cdiv(n, block_rows),)
        launch(_gated_fwd_kernel)[grid](
            core, gate, w_core, b_core, w_gate, b_gate, weight if has_weight else core,
            out, stats, n, d, m, eps_hi, eps_lo,
            HAS_WEIGHT=has_weight, BLOCK_ROWS=block_rows, BLOCK_D=block_d,
            num_warps=_NUM_WARPS)
    return out, stats


@_gated_fwd.register_fake
def _(core, gate, w_core, b_core, w_gate, b_gate, weight, eps):
    return torch.empty_like(core), core.new_empty((4, core.shape[0]))


@kernel_op("fastchgnet::gated_epilogue_backward")
def _gated_bwd(grad_out: Tensor, core: Tensor, gate: Tensor, w_core: Tensor, b_core: Tensor,
               w_gate: Tensor, b_gate: Tensor, weight: Tensor, stats: Tensor,
               eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_core, grad_gate, grad_params (4, d) = (w_core, b_core, w_gate, b_gate), grad_weight).

    ``grad_weight`` is (m, d), or empty 1-D when ``weight`` is the sentinel. ``eps`` is unused
    (``stats`` carries rstd) but kept so the double-backward formula can recompute the reference.
    """
    grad_out, core, gate = grad_out.contiguous(), core.contiguous(), gate.contiguous()
    w_core, b_core = w_core.contiguous(), b_core.contiguous()
    w_gate, b_gate = w_gate.contiguous(), b_gate.contiguous()
    weight, stats = weight.contiguous(), stats.contiguous()
    n, d = core.shape
    has_weight = weight.dim() == 2
    m = weight.shape[0] if has_weight else 1
    grad_core = torch.empty_like(core)
    grad_gate = torch.empty_like(gate)
    if n == 0:
        grad_params = core.new_zeros((4, d))
        grad_weight = torch.zeros_like(weight) if has_weight else core.new_empty(0)
        return grad_core, grad_gate, grad_params, grad_weight
    block_rows, block_d = _block_sizes(d)
    n_tiles = triton.cdiv(n, block_rows)
    nprog = min(n_tiles, _MAX_BWD_PROGRAMS)
    tiles_per_prog = triton.cdiv(n_tiles, nprog)
    partial = core.new_empty((4, nprog, d))
    wrows = torch.empty_like(core) if has_weight else None
    launch(_gated_bwd_kernel)[(nprog,)](
        grad_out, core, gate, w_core, b_core, w_gate, b_gate, weight if has_weight else core,
        stats, grad_core, grad_gate, wrows if has_weight else grad_out, partial,
        n, d, m, tiles_per_prog,
        HAS_WEIGHT=has_weight, BLOCK_ROWS=block_rows, BLOCK_D=block_d,
        TILES=_interpreted_tiles(tiles_per_prog), num_warps=_NUM_WARPS)
    grad_params = partial.sum(dim=1)
    if not has_weight:
        grad_weight = core.new_empty(0)
    elif m == n:
        grad_weight = wrows
    else:
        grad_weight = wrows.view(n // m, m, d).sum(dim=0)
    return grad_core, grad_gate, grad_params, grad_weight


@_gated_bwd.register_fake
def _(grad_out, core, gate, w_core, b_core, w_gate, b_gate, weight, stats, eps):
    grad_weight = torch.empty_like(weight) if weight.dim() == 2 else core.new_empty(0)
    return (torch.empty_like(core), torch.empty_like(gate), core.new_empty((4, core.shape[1])),
            grad_weight)


# ------------------------------------------------------------------------------------------------
# autograd


def _fwd_setup(ctx, inputs, output):
    core, gate, w_core, b_core, w_gate, b_gate, weight, eps = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(core, gate, w_core, b_core, w_gate, b_gate, weight, stats)
    ctx.eps = eps


def _fwd_backward(ctx, grad_out, _grad_stats):
    core, gate, w_core, b_core, w_gate, b_gate, weight, stats = ctx.saved_tensors
    g_core, g_gate, g_par, g_weight = _gated_bwd(grad_out, core, gate, w_core, b_core, w_gate,
                                                 b_gate, weight, stats, ctx.eps)
    g_weight = g_weight if weight.dim() == 2 else None
    return g_core, g_gate, g_par[0], g_par[1], g_par[2], g_par[3], g_weight, None


_gated_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def _bwd_setup(ctx, inputs, output):
    grad_out, core, gate, w_core, b_core, w_gate, b_gate, weight, _stats, eps = inputs
    ctx.save_for_backward(grad_out, core, gate, w_core, b_core, w_gate, b_gate, weight)
    ctx.eps = eps


def _bwd_backward(ctx, gg_core, gg_gate, gg_par, gg_weight):
    """Derivative of the backward op, from the reference's vector-Jacobian product in plain torch.

    The backward op is ``v -> vjp(ref, inputs)(v)`` (``ref``: ``_torch_math.gated_epilogue``);
    its own VJP against the incoming ``gg_*`` is obtained by differentiating that VJP once more.
    With ``create_graph`` (grad mode on here) the result stays differentiable (third and higher
    orders); inputs that require grad enter through a ``view_as`` so that each input slot gets
    only its own path even if two inputs alias.
    """
    saved = ctx.saved_tensors
    has_weight = saved[7].dim() == 2
    create = torch.is_grad_enabled()
    tensors = saved if has_weight else saved[:7]
    if gg_par is not None:
        gg_par = gg_par.unbind(0)
    else:
        gg_par = (None,) * 4
    ggs = (gg_core, gg_gate, *gg_par, gg_weight if has_weight else None)
    with torch.enable_grad():
        xs = [t.view_as(t) if (create and t.requires_grad) else t.detach().requires_grad_()
              for t in tensors]
        go, core, gate, w_core, b_core, w_gate, b_gate = xs[:7]
        out = _torch_gated_epilogue(core, gate, w_core, b_core, w_gate, b_gate, ctx.eps,
                                    xs[7] if has_weight else None)
        firsts = torch.autograd.grad(out, xs[1:], go, create_graph=True, allow_unused=True)
        pairs = [(f, g) for f, g in zip(firsts, ggs)
                 if f is not None and g is not None and f.requires_grad]
        if pairs:
            res = torch.autograd.grad([f for f, _ in pairs], xs, [g for _, g in pairs],
                                      create_graph=create, allow_unused=True)
        else:
            res = (None,) * len(xs)
    res = list(res)
    if not has_weight:
        res.append(None)
    return (*res, None, None)  # stats, eps


_gated_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup)


# ------------------------------------------------------------------------------------------------
# public function


def gated_epilogue(core: Tensor, gate: Tensor, w_core: Optional[Tensor], b_core: Optional[Tensor],
                   w_gate: Optional[Tensor], b_gate: Optional[Tensor], eps: float = 1e-5,
                   weight: Optional[Tensor] = None) -> Tensor:
    """Triton version of :func:`fastchgnet.nn.functional.gated_epilogue` (same signature).

    Runs the kernel for float32/float64 with all four LayerNorm parameters given and
    ``d <= 256``; anything else (no LayerNorm, other dtypes, mixed dtypes/devices, wider rows) goes
    to plain torch (``_torch_math.gated_epilogue``, the reference's math). ``core``/``gate`` may
    have leading dims (flattened to rows).
    """
    params = (w_core, b_core, w_gate, b_gate)
    d = core.shape[-1] if core.dim() else 0
    supported = (
        all(p is not None for p in params)
        and core.dtype in (torch.float32, torch.float64)
        and core.dim() >= 1 and gate.shape == core.shape and 0 < d <= _MAX_D
        and all(t.dtype == core.dtype and t.device == core.device
                for t in (gate, *params, *((weight,) if weight is not None else ())))
        and all(p.shape == (d,) for p in params)
    )
    if not supported:
        return _torch_gated_epilogue(core, gate, w_core, b_core, w_gate, b_gate, eps, weight)
    shape = core.shape
    core2, gate2 = core.reshape(-1, d), gate.reshape(-1, d)
    n = core2.shape[0]
    if weight is not None:
        m = weight.shape[0]
        if weight.dim() != 2 or weight.shape[1] != d or (n % m if m else n):
            raise ValueError(f"weight {tuple(weight.shape)} must be (m, {d}) with m dividing "
                             f"the {n} rows")
    else:
        weight = core.new_empty(0)  # sentinel: no weight
    out, _ = _gated_fwd(core2, gate2, w_core, b_core, w_gate, b_gate, weight, float(eps))
    return out.view(shape)
