"""Triton kernels for fastchgnet, installed as ``fastchgnet.kernels``.

One dispatch point chooses, per call, between a Triton kernel and the plain-torch reference in
:mod:`fastchgnet.nn.functional`:

* ``FASTCHGNET_KERNELS=auto`` (default): Triton for CUDA tensors when Triton is installed, torch
  otherwise;
* ``FASTCHGNET_KERNELS=triton``: always Triton (on the CPU this needs ``TRITON_INTERPRET=1`` set
  before the first kernel is imported — slow, for tests);
* ``FASTCHGNET_KERNELS=torch``: always the reference.

The variable is read at every call, so tests can switch paths. Triton itself is imported only
when a kernel is first used. Never install this directory as a top-level ``kernels`` module
(a PyPI package of that name exists).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator

from torch import Tensor

__all__ = ["angle_basis", "backend", "gated_epilogue", "has_triton", "interpreting", "override",
           "radial_bases", "use_triton"]

_VALID = ("auto", "triton", "torch")


def has_triton() -> bool:
    """Whether the ``triton`` package is importable."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs in interpreter mode (``TRITON_INTERPRET=1``, kernels on the CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend() -> str:
    """The requested path: ``auto``, ``triton`` or ``torch`` (from ``FASTCHGNET_KERNELS``)."""
    val = os.environ.get("FASTCHGNET_KERNELS", "auto").strip().lower() or "auto"
    if val not in _VALID:
        raise ValueError(f"FASTCHGNET_KERNELS={val!r}: use one of {_VALID}")
    return val


@contextlib.contextmanager
def override(mode: str | None) -> Iterator[None]:
    """Set ``FASTCHGNET_KERNELS`` to ``mode`` for the duration (None: leave it as it is)."""
    if mode is None:
        yield
        return
    old = os.environ.get("FASTCHGNET_KERNELS")
    os.environ["FASTCHGNET_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTCHGNET_KERNELS", None)
        else:
            os.environ["FASTCHGNET_KERNELS"] = old


def use_triton(x: Tensor) -> bool:
    """Whether a fused op on tensors like ``x`` should run the Triton kernel."""
    mode = backend()
    if mode == "torch":
        return False
    if mode == "auto":
        return x.is_cuda and has_triton()
    if not has_triton():
        raise RuntimeError("FASTCHGNET_KERNELS=triton but the triton package is not installed")
    if not x.is_cuda and not interpreting():
        raise RuntimeError(
            "FASTCHGNET_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1, set before "
            "fastchgnet's kernels are first imported"
        )
    return True


# ----------------------------------------------------------------------------------------------
# the fused ops: Triton when use_triton(), else the reference in fastchgnet.nn.functional


def radial_bases(r: Tensor, freq_a: Tensor, freq_b: Tensor, cutoff_a: float, cutoff_b: float,
                 p: int) -> tuple[Tensor, Tensor]:
    """Both smooth radial Bessel bases of the bond lengths ``r`` (see nn.functional)."""
    if use_triton(r):
        from fastchgnet.kernels.radial import radial_bases as fused

        return fused(r, freq_a, freq_b, cutoff_a, cutoff_b, p)
    from fastchgnet.nn.functional import radial_bases as ref

    return ref(r, freq_a, freq_b, cutoff_a, cutoff_b, p)


def angle_basis(unit: Tensor, b1: Tensor, b2: Tensor, sign: Tensor, freq: Tensor) -> Tensor:
    """Fourier basis of the angles between bond pairs (see nn.functional)."""
    if use_triton(unit):
        from fastchgnet.kernels.angle import angle_basis as fused

        return fused(unit, b1, b2, sign, freq)
    from fastchgnet.nn.functional import angle_basis as ref

    return ref(unit, b1, b2, sign, freq)


def gated_epilogue(core: Tensor, gate: Tensor, w_core: Tensor | None, b_core: Tensor | None,
                   w_gate: Tensor | None, b_gate: Tensor | None, eps: float = 1e-5,
                   weight: Tensor | None = None) -> Tensor:
    """``silu(LN(core)) * sigmoid(LN(gate)) [* weight]`` (see nn.functional)."""
    if w_core is not None and use_triton(core):
        from fastchgnet.kernels.gated import gated_epilogue as fused

        return fused(core, gate, w_core, b_core, w_gate, b_gate, eps, weight)
    from fastchgnet.nn.functional import gated_epilogue as ref

    return ref(core, gate, w_core, b_core, w_gate, b_gate, eps, weight)
