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

import importlib.util
import os

from torch import Tensor

__all__ = ["backend", "has_triton", "interpreting", "use_triton"]

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
