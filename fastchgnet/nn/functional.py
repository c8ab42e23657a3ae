"""Plain-torch reference implementations of the fused paths (the Triton kernels' contracts).

Each of :func:`radial_bases`, :func:`angle_basis` and :func:`gated_epilogue` is the reference of
one Triton kernel in :mod:`fastchgnet.kernels` (``kernels/``); both must agree in value and in
every first and second derivative. :mod:`fastchgnet.nn.fused` chooses per call between the two;
model code calls it rather than this module or the kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _envelope_coefficients(p: int) -> tuple[float, float, float]:
    return -(p + 1) * (p + 2) / 2, float(p * (p + 2)), -p * (p + 1) / 2


def envelope(x: Tensor, p: int) -> Tensor:
    """Polynomial cutoff envelope at scaled distance ``x = r / rc``; zero for ``x >= 1``.

    ``1 + a x^p + b x^(p+1) + c x^(p+2)`` evaluated factored as ``1 + x^p (a + x (b + c x))``
    (FastCHGNet Eq. 13), with ``a = -(p+1)(p+2)/2, b = p(p+2), c = -p(p+1)/2``.
    """
    a, b, c = _envelope_coefficients(p)
    val = 1 + x.pow(p) * (a + x * (b + c * x))
    return torch.where(x < 1, val, torch.zeros_like(x))


def envelope_derivative(x: Tensor, p: int) -> Tensor:
    """d/dx of :func:`envelope`: ``x^(p-1) (p a + x ((p+1) b + (p+2) c x))``; zero for ``x >= 1``."""
    a, b, c = _envelope_coefficients(p)
    val = x.pow(p - 1) * (p * a + x * ((p + 1) * b + (p + 2) * c * x))
    return torch.where(x < 1, val, torch.zeros_like(x))


def radial_basis(r: Tensor, freq: Tensor, cutoff: float, p: int) -> Tensor:
    """Smooth radial Bessel basis (n,) -> (n, K): ``sqrt(2/rc) sin(w_k r/rc) / r * env(r/rc)``.

    ``p = 0`` disables the envelope.
    """
    x = (r / cutoff)[:, None]
    basis = torch.sin(freq * x) / r[:, None]
    norm = math.sqrt(2.0 / cutoff)
    if p:
        return basis * (norm * envelope(x, p))
    return basis * norm


def radial_bases(r: Tensor, freq_a: Tensor, freq_b: Tensor, cutoff_a: float, cutoff_b: float,
                 p: int) -> tuple[Tensor, Tensor]:
    """Both radial bases of CHGNet (6 Å atom graph, 3 Å bond graph) of the same lengths."""
    return radial_basis(r, freq_a, cutoff_a, p), radial_basis(r, freq_b, cutoff_b, p)


def angle_basis(unit: Tensor, b1: Tensor, b2: Tensor, sign: Tensor, freq: Tensor) -> Tensor:
    """Fourier angle basis of bond pairs.

    ``unit`` (n_bonds, 3) unit bond vectors; per angle the legs ``b1``, ``b2`` (int64) and the
    product of their direction signs ``sign`` (+-1). ``cos = (u[b1] . u[b2]) * sign * (1 - 1e-6)``,
    ``t = arccos(cos)``, output ``[1/sqrt(2), sin(w_k t), cos(w_k t)] / sqrt(pi)`` of width
    ``2 K + 1`` for ``K = len(freq)``.
    """
    cos = (unit.index_select(0, b1) * unit.index_select(0, b2)).sum(dim=1) * sign
    theta = torch.acos(cos * (1 - 1e-6))
    arg = theta[:, None] * freq
    inv = 1.0 / math.sqrt(math.pi)
    const = torch.full_like(theta[:, None], inv / math.sqrt(2.0))
    return torch.cat([const, torch.sin(arg) * inv, torch.cos(arg) * inv], dim=1)


def gated_epilogue(core: Tensor, gate: Tensor, w_core: Tensor | None, b_core: Tensor | None,
                   w_gate: Tensor | None, b_gate: Tensor | None, eps: float = 1e-5,
                   weight: Tensor | None = None) -> Tensor:
    """GatedMLP output ``silu(LN(core)) * sigmoid(LN(gate)) [* weight]``.

    ``core``, ``gate``: (n, d). LayerNorm over the last dim with affine ``w_*``, ``b_*`` (d,);
    ``w_core is None`` means no normalisation. ``weight`` (m, d) with ``n = k * m`` multiplies row
    ``i`` by ``weight[i % m]`` (the atom convolution's two bond directions share one weight row).
    """
    if w_core is not None:
        d = core.shape[-1]
        core = F.layer_norm(core, (d,), w_core, b_core, eps)
        gate = F.layer_norm(gate, (d,), w_gate, b_gate, eps)
    out = F.silu(core) * torch.sigmoid(gate)
    if weight is not None:
        m = weight.shape[0]
        if m == out.shape[0] or m == 0:  # m == 0 only with n == 0 (a batch without bonds)
            out = out * weight if m else out
        else:
            out = (out.view(-1, m, out.shape[-1]) * weight).view(out.shape)
    return out
