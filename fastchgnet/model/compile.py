"""Deprecated: compiled interaction blocks, the compiled training step and the compile settings
moved to :mod:`fastchgnet.compile` (``compile_blocks``, ``uncompile_blocks``, ``CompiledStep``,
``compile_callable``, ``check_first_order``, ``CompileCounter``). This module re-exports them and
will be removed in 0.2."""

from __future__ import annotations

import warnings

from fastchgnet.compile.blocks import compile_blocks, uncompile_blocks
from fastchgnet.compile.settings import (CompileCounter, _patch, _Scoped, check_first_order,
                                         compile_callable)
from fastchgnet.compile.step import CompiledStep

warnings.warn("fastchgnet.model.compile moved to fastchgnet.sim / fastchgnet.compile; "
              "will be removed in 0.2", DeprecationWarning, stacklevel=2)

__all__ = ["CompileCounter", "CompiledStep", "_Scoped", "_patch", "check_first_order",
           "compile_blocks", "compile_callable", "uncompile_blocks"]
