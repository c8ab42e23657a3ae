"""Triton kernels of fastchgnet and the policy choosing them (installed as ``fastchgnet.kernels``).

Layout of the fused ops (see ``docs/kernels.md``):

* references (the contracts): :mod:`fastchgnet.nn.functional`, plain torch;
* dispatch: :mod:`fastchgnet.nn.fused`, one function per op, which asks :func:`use_triton` and
  calls the kernel or the reference;
* here: the Triton kernels (``radial``, ``angle``, ``gated``: each a ``torch.library`` op with a
  differentiable backward op, registered through ``_registry``) and the selection policy.

This package imports nothing from :mod:`fastchgnet.nn`. Importing it does not import Triton nor
the kernel modules; a kernel module (and with it Triton) is imported when first used.

Selection policy, from ``FASTCHGNET_KERNELS``, read at every call (tests switch paths with
:func:`override`):

* ``auto`` (default): Triton for CUDA tensors when Triton is installed, torch otherwise;
* ``triton``: always Triton (on the CPU this needs ``TRITON_INTERPRET=1`` set before the first
  kernel module is imported — slow, for tests);
* ``torch``: always the reference.

Never install this directory as a top-level ``kernels`` module (a PyPI package of that name
exists).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from torch import Tensor

from fastchgnet.kernels._env import has_triton, interpreting

__all__ = ["backend", "has_triton", "interpreting", "override", "use_triton"]

_VALID = ("auto", "triton", "torch")


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


# the dispatchers moved to the nn side (kernels import nothing of fastchgnet.nn, so no alias can
# forward to them from here): name the new place instead of a bare AttributeError
_MOVED = {"radial_bases", "angle_basis", "gated_epilogue"}


def __getattr__(name: str):
    if name in _MOVED:
        raise AttributeError(
            f"fastchgnet.kernels.{name} moved to fastchgnet.nn.fused.{name} (the one dispatch "
            f"point between the Triton kernel and the torch reference); the kernel itself is in "
            f"fastchgnet.kernels.{ {'radial_bases': 'radial', 'angle_basis': 'angle', 'gated_epilogue': 'gated'}[name]}")
    raise AttributeError(f"module 'fastchgnet.kernels' has no attribute {name!r}")
