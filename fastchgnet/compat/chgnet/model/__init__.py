"""chgnet's ``chgnet.model``: ``CHGNet``, ``StructOptimizer``, ``CHGNetCalculator``,
``MolecularDynamics`` (and ``EquationOfState``), on fastchgnet's exact model."""

from __future__ import annotations

from fastchgnet.compat.chgnet.model.dynamics import (CHGNetCalculator, EquationOfState,
                                                     MolecularDynamics, StructOptimizer)
from fastchgnet.compat.chgnet.model.model import CHGNet

__all__ = ["CHGNet", "CHGNetCalculator", "EquationOfState", "MolecularDynamics", "StructOptimizer"]
