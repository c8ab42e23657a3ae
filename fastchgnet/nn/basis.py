"""Radial and angular bases of CHGNet as modules holding the learnable frequencies.

The mathematics lives in :mod:`fastchgnet.nn.functional` (the plain-torch reference);
:mod:`fastchgnet.nn.fused` chooses per call between it and the Triton kernel of
:mod:`fastchgnet.kernels`.

* Smooth radial Bessel basis: ``sqrt(2/rc) * sin(w_k r / rc) / r * envelope(r / rc)`` with learnable
  frequencies ``w_k`` (initialised at ``k * pi``), for the 6 Å and the 3 Å cutoffs.
* Polynomial envelope of order p: ``1 + a x^p + b x^(p+1) + c x^(p+2)`` for ``x < 1`` else 0, with
  ``a = -(p+1)(p+2)/2, b = p(p+2), c = -p(p+1)/2``, evaluated factored as
  ``1 + x^p (a + x (b + c x))`` (FastCHGNet Eq. 13).
* Fourier angle basis: ``[1/sqrt(2), sin(w_k t), cos(w_k t)] / sqrt(pi)`` with learnable ``w_k``
  (initialised at k) and ``t = arccos(cos_ij * (1 - 1e-6))``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastchgnet.nn import functional as F
from fastchgnet.nn import fused


class RadialBessel(nn.Module):
    """Smooth radial Bessel basis with envelope; ``forward(r)`` maps (n,) lengths to (n, num_radial)."""

    def __init__(self, num_radial: int = 31, cutoff: float = 6.0, envelope_p: int = 8,
                 learnable: bool = True) -> None:
        super().__init__()
        self.num_radial = num_radial
        self.cutoff = float(cutoff)
        self.envelope_p = int(envelope_p)
        freq = math.pi * torch.arange(1, num_radial + 1, dtype=torch.float32)
        if learnable:
            self.frequencies = nn.Parameter(freq)
        else:
            self.register_buffer("frequencies", freq)

    def forward(self, r: Tensor) -> Tensor:
        return F.radial_basis(r, self.frequencies, self.cutoff, self.envelope_p)

    def extra_repr(self) -> str:
        return f"num_radial={self.num_radial}, cutoff={self.cutoff}, envelope_p={self.envelope_p}"


class FourierAngle(nn.Module):
    """Fourier basis of the angle from its cosine; ``forward(cos)`` maps (n,) to (n, 2*order+1)."""

    def __init__(self, num_angular: int = 31, learnable: bool = True) -> None:
        super().__init__()
        if num_angular % 2 != 1:
            raise ValueError(f"num_angular must be odd, got {num_angular}")
        self.order = (num_angular - 1) // 2
        freq = torch.arange(1, self.order + 1, dtype=torch.float32)
        if learnable:
            self.frequencies = nn.Parameter(freq)
        else:
            self.register_buffer("frequencies", freq)

    def forward(self, unit: Tensor, b1: Tensor, b2: Tensor, sign: Tensor) -> Tensor:
        """Basis of the angles between legs ``b1`` and ``b2`` of the unit bond vectors ``unit``."""
        return fused.angle_basis(unit, b1, b2, sign, self.frequencies)
