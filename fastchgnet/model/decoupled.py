"""The ``decoupled`` model: FastCHGNet's interaction block without its serial dependency.

In CHGNet a block runs three updates in sequence: the atom convolution, then the bond convolution
that reads the *new* atom features, then the angle update that reads the new atom and bond
features. FastCHGNet (Eq. 11) lets the bond convolution and the angle update read the block's
*input* features ``v^t`` and ``e^t`` instead::

    v^{t+1} = AtomConv(v^t, e^t)
    e^{t+1} = BondConv(v^t, e^t, a^t)
    a^{t+1} = AngleUpdate(v^t, e^t, a^t)

The three updates are then independent. The bond convolution and the angle update have the same
GatedMLP input per angle, ``[e[b1], e[b2], a, v[center]]``, so their first layers are packed into
one set of matrix products and gathers (one GEMM per feature kind, one gather per index) and
split afterwards. Energy, forces and stress are as in :class:`~fastchgnet.model.exact.CHGNet`
(forces and stress by autograd). The parameters are those of the exact model, under the same
names, so a decoupled model can start from exact (e.g. 0.3.0) weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastchgnet.model.exact import CHGNet

__all__ = ["DecoupledCHGNet"]


class DecoupledCHGNet(CHGNet):
    """CHGNet with FastCHGNet's decoupled interaction block (``model_type = "decoupled"``)."""

    model_type = "decoupled"

    def interaction(self, i: int, atom: Tensor, bond: Tensor, angle: Tensor, bw_ag: Tensor,
                    bw_bg: Tensor, src_dir: Tensor, dst_dir: Tensor, center: Tensor, b1: Tensor,
                    b2: Tensor, update_angle: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        c = self.config
        new_atom = self.atom_convs[i](atom, bond, bw_ag, src_dir, dst_dir)
        bc = self.bond_convs[i] if c.update_bond else None
        au = self.angle_updates[i] if (c.update_angle and update_angle) else None
        if bc is None or au is None:  # at most one of the two: nothing to pack
            new_bond = bond if bc is None else bc(atom, bond, bw_bg, angle, center, b1, b2)
            new_angle = angle if au is None else au(atom, bond, angle, center, b1, b2)
            return new_atom, new_bond, new_angle

        # one packed first layer for both GatedMLPs: rows [bond conv | angle update]
        wb, wa = 2 * bc.tail.width, 2 * au.tail.width
        bc1, bc2 = bc.w_bond.split(wb, dim=0)
        au1, au2 = au.w_bond.split(wa, dim=0)
        w_bond = torch.cat([bc1, au1, bc2, au2])
        pb1, pb2 = (bond @ w_bond.t()).split(wb + wa, dim=1)
        pa = atom @ torch.cat([bc.w_atom, au.w_atom]).t()
        pre = torch.addmm(torch.cat([bc.bias, au.bias]), angle, torch.cat([bc.w_angle, au.w_angle]).t())
        pre.add_(pb1.index_select(0, b1)).add_(pb2.index_select(0, b2))
        pre.add_(pa.index_select(0, center))
        pre_bc, pre_au = pre.split([wb, wa], dim=1)

        weight = bw_bg.index_select(0, b1) * bw_bg.index_select(0, b2)
        upd = bc.tail(pre_bc, weight)
        summed = bond.new_zeros(bond.shape).index_add_(0, b1, upd)
        new_bond = (bc.mlp_out(summed) if bc.mlp_out is not None else summed) + bond
        new_angle = au.tail(pre_au) + angle
        return new_atom, new_bond, new_angle
