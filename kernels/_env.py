"""What the environment offers the kernels: is Triton installed, does it run interpreted.

Kept apart from the package ``__init__`` so that the kernel modules and ``_registry`` can import
it without importing the package that re-exports them. Imports neither Triton nor torch.
"""

from __future__ import annotations

import importlib.util
import os

__all__ = ["has_triton", "interpreting"]


def has_triton() -> bool:
    """Whether the ``triton`` package is importable (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs in interpreter mode (``TRITON_INTERPRET=1``, kernels on the CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
