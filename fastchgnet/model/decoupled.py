"""The ``decoupled`` model: FastCHGNet's interaction block without its serial dependency.

In CHGNet a block runs three updates in sequence: the atom convolution, then the bond convolution
that reads the *new* atom features, then the angle update that reads the new atom and bond
features. FastCHGNet (Eq. 11) lets the bond convolution and the angle update read the block's
*input* features ``v^t`` and ``e^t`` instead::

    v^{t+1} = AtomConv(v^t, e^t)
    e^{t+1} = BondConv(v^t, e^t, a^t)
    a^{t+1} = AngleUpdate(v^t, e^t, a^t)

The block itself is :func:`fastchgnet.model.blocks.decoupled_block`. Energy, forces and stress are
as in :class:`~fastchgnet.model.exact.CHGNet` (forces and stress by autograd). The parameters are
those of the exact model, under the same names, so a decoupled model can start from exact (e.g.
0.3.0) weights.
"""

from __future__ import annotations

from typing import Any

from fastchgnet.model.config import CHGNetConfig
from fastchgnet.model.exact import CHGNet

__all__ = ["DecoupledCHGNet"]


class DecoupledCHGNet(CHGNet):
    """CHGNet with FastCHGNet's decoupled block (``model_type = "decoupled"``): the
    decoupled block and autograd forces/stress."""

    model_type = "decoupled"

    def __init__(self, config: CHGNetConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, block="decoupled", **overrides)
