"""The dispatch point of the fused ops: per call, the Triton kernel or the plain-torch reference.

Three layers, each depending only on the ones above it:

* :mod:`fastchgnet.nn.functional`: the plain-torch references, the contracts of the kernels
  (values and every first and second derivative);
* :mod:`fastchgnet.kernels` (directory ``kernels/``): the Triton kernels, registered as
  ``torch.library`` ops, and the selection policy (:func:`~fastchgnet.kernels.use_triton`, read
  from ``FASTCHGNET_KERNELS``; :func:`~fastchgnet.kernels.override`). It imports nothing from
  :mod:`fastchgnet.nn`;
* this module: one function per fused op, with the reference's signature, which asks the policy
  and calls either the kernel or the reference. Model code (``nn/basis.py``, ``nn/layers.py``,
  ``model/exact.py``) calls these functions, never a kernel module directly.

A kernel module (which imports Triton) is imported only when the policy first chooses it, so
importing this module does not import Triton. The kernel function is looked up on its module at
every call (tests wrap it to count calls).

Adding a fused op ``foo``: write the reference ``foo`` in ``nn/functional.py``; the kernel, its
backward and their ``torch.library`` registration (``kernels/_registry.py``) in ``kernels/foo.py``
with a public ``foo`` of the same signature; a dispatcher here following :func:`radial_bases`;
tests comparing values and first and second derivatives with the reference (see
``docs/kernels.md``).
"""

from __future__ import annotations

from torch import Tensor

from fastchgnet.kernels import use_triton
from fastchgnet.nn import functional as ref

__all__ = ["angle_basis", "gated_epilogue", "radial_bases"]

# The kernel modules import Triton: each dispatcher imports its module in the branch that runs the
# kernel (a plain ``from ... import`` statement, which torch.compile traces without a graph break).


def radial_bases(r: Tensor, freq_a: Tensor, freq_b: Tensor, cutoff_a: float, cutoff_b: float,
                 p: int) -> tuple[Tensor, Tensor]:
    """Both smooth radial Bessel bases of the bond lengths ``r``
    (:func:`fastchgnet.nn.functional.radial_bases`)."""
    if use_triton(r):
        from fastchgnet.kernels import radial

        return radial.radial_bases(r, freq_a, freq_b, cutoff_a, cutoff_b, p)
    return ref.radial_bases(r, freq_a, freq_b, cutoff_a, cutoff_b, p)


def angle_basis(unit: Tensor, b1: Tensor, b2: Tensor, sign: Tensor, freq: Tensor) -> Tensor:
    """Fourier basis of the angles between bond pairs
    (:func:`fastchgnet.nn.functional.angle_basis`)."""
    if use_triton(unit):
        from fastchgnet.kernels import angle

        return angle.angle_basis(unit, b1, b2, sign, freq)
    return ref.angle_basis(unit, b1, b2, sign, freq)


def gated_epilogue(core: Tensor, gate: Tensor, w_core: Tensor | None, b_core: Tensor | None,
                   w_gate: Tensor | None, b_gate: Tensor | None, eps: float = 1e-5,
                   weight: Tensor | None = None) -> Tensor:
    """``silu(LN(core)) * sigmoid(LN(gate)) [* weight]``
    (:func:`fastchgnet.nn.functional.gated_epilogue`). Without LayerNorm (``w_core is None``)
    there is nothing to fuse: always the reference."""
    if w_core is not None and use_triton(core):
        from fastchgnet.kernels import gated

        return gated.gated_epilogue(core, gate, w_core, b_core, w_gate, b_gate, eps, weight)
    return ref.gated_epilogue(core, gate, w_core, b_core, w_gate, b_gate, eps, weight)
