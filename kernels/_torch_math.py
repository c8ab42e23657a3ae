"""Plain-torch math the kernels need for themselves (no import of :mod:`fastchgnet.nn`).

:func:`gated_epilogue` is the same function as :func:`fastchgnet.nn.functional.gated_epilogue`
(the contract; ``tests/test_kernels_gated.py`` compares the kernel, and through it this copy, with
that reference). ``kernels/gated.py`` uses it for the inputs its kernel does not take and to write
the derivative of its backward op as differentiable torch operations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gated_epilogue(core: Tensor, gate: Tensor, w_core: Tensor | None, b_core: Tensor | None,
                   w_gate: Tensor | None, b_gate: Tensor | None, eps: float = 1e-5,
                   weight: Tensor | None = None) -> Tensor:
    """``silu(LN(core)) * sigmoid(LN(gate)) [* weight]``; no LayerNorm when ``w_core is None``;
    ``weight`` (m, d) multiplies row ``i`` by ``weight[i % m]``."""
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
