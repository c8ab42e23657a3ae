"""chgnet's inference API on fastchgnet: replace ``chgnet`` by ``fastchgnet.compat.chgnet`` in the
import lines of a chgnet script and it runs unchanged, on fastchgnet's exact model.

Modules (as in chgnet 0.4.2):

* :mod:`fastchgnet.compat.chgnet.model` — ``CHGNet``, ``StructOptimizer``, ``CHGNetCalculator``,
  ``MolecularDynamics`` (and ``EquationOfState``);
* :mod:`fastchgnet.compat.chgnet.model.model` — ``CHGNet``;
* :mod:`fastchgnet.compat.chgnet.model.dynamics` — ``CHGNetCalculator``, ``StructOptimizer``,
  ``TrajectoryObserver``, ``CrystalFeasObserver``, ``MolecularDynamics``, ``EquationOfState``;
* :mod:`fastchgnet.compat.chgnet.graph` — ``CrystalGraphConverter``, ``CrystalGraph``;
* :mod:`fastchgnet.compat.chgnet.utils` — ``solve_charge_by_mag``, ``determine_device``, ...

Defaults are chgnet's wherever the name is chgnet's; unknown keyword arguments are errors. Training
(``chgnet.trainer``, ``chgnet.data``) is not mirrored: use ``fastchgnet train`` (docs/training.md).
"""

from __future__ import annotations

from typing import Literal

#: the chgnet release whose API this package mirrors
__version__ = "0.4.2"

TrainTask = Literal["ef", "efs", "efsm"]
PredTask = Literal["e", "ef", "em", "efs", "efsm"]

__all__ = ["PredTask", "TrainTask", "__version__"]
