"""The interaction blocks: CHGNet's serial block and FastCHGNet's decoupled block.

A block is a function ``block(layers, i, atom, bond, angle, bw_ag, bw_bg, src_dir, dst_dir,
center, b1, b2, update_angle) -> (atom, bond, angle)`` of the layers of a
:class:`~fastchgnet.model.backbone.Backbone` (``atom_convs``, ``bond_convs``, ``angle_updates``)
and block index ``i``. The backbone calls it ``n_conv - 1`` times; which function it calls is
the only difference between the ``exact`` and ``decoupled`` models' backbones.

Shapes: ``atom`` (n_atoms, A), ``bond`` (n_bonds, B), ``angle`` (n_angles, G); ``bw_ag``
(n_bonds, A) and ``bw_bg`` (n_bonds, B) the bond weights of the 6 Å and 3 Å graphs; ``src_dir``
/ ``dst_dir`` (2 n_bonds,) centre and neighbour of each directed bond; ``center``, ``b1``, ``b2``
(n_angles,) the angle's centre atom and its two legs (undirected bond rows). ``rows``, when
given, are the bonds the angles use (CHGNet's 3 Å bond graph, a small part of the 6 Å bonds):
``b1``, ``b2`` and ``bw_bg`` then refer to ``bond[rows]``, and the bond and angle updates run on
those rows only (the other bonds' updates are empty sums).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from fastchgnet.nn.layers import add_rows
from fastchgnet.nn.linear import linear
from fastchgnet.nn.scatter import segment_sum

__all__ = ["BLOCKS", "Block", "decoupled_block", "exact_block"]

Block = Callable[..., tuple[Tensor, Tensor, Tensor]]


def exact_block(m: Any, i: int, atom: Tensor, bond: Tensor, angle: Tensor, bw_ag: Tensor,
                bw_bg: Tensor, src_dir: Tensor, dst_dir: Tensor, center: Tensor, b1: Tensor,
                b2: Tensor, update_angle: bool = True,
                rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """CHGNet's order: atom conv, then the bond conv reads the new atom features, then the angle
    update reads the new atom and bond features."""
    c = m.config
    atom = m.atom_convs[i](atom, bond, bw_ag, src_dir, dst_dir)
    new_bond = (m.bond_convs[i](atom, bond, bw_bg, angle, center, b1, b2, rows) if c.update_bond
                else bond)
    if c.update_angle and update_angle:
        angle = m.angle_updates[i](atom, new_bond, angle, center, b1, b2, rows)
    return atom, new_bond, angle


def decoupled_block(m: Any, i: int, atom: Tensor, bond: Tensor, angle: Tensor, bw_ag: Tensor,
                    bw_bg: Tensor, src_dir: Tensor, dst_dir: Tensor, center: Tensor, b1: Tensor,
                    b2: Tensor, update_angle: bool = True,
                    rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """FastCHGNet's block (Eq. 11): the three updates all read the block's input features.

    The bond convolution and the angle update then have the same GatedMLP input per angle,
    ``[e[b1], e[b2], a, v[center]]``: their first layers run as one packed set of matrix
    products and gathers (one GEMM per feature kind, one gather per index), split afterwards.
    """
    c = m.config
    new_atom = m.atom_convs[i](atom, bond, bw_ag, src_dir, dst_dir)
    bc = m.bond_convs[i] if c.update_bond else None
    au = m.angle_updates[i] if (c.update_angle and update_angle) else None
    if bc is None or au is None:  # at most one of the two: nothing to pack
        new_bond = bond if bc is None else bc(atom, bond, bw_bg, angle, center, b1, b2, rows)
        new_angle = angle if au is None else au(atom, bond, angle, center, b1, b2, rows)
        return new_atom, new_bond, new_angle

    # one packed first layer for both GatedMLPs: rows [bond conv | angle update]
    wb, wa = 2 * bc.tail.width, 2 * au.tail.width
    bc1, bc2 = bc.w_bond.split(wb, dim=0)
    au1, au2 = au.w_bond.split(wa, dim=0)
    w_bond = torch.cat([bc1, au1, bc2, au2])
    sub = bond if rows is None else bond.index_select(0, rows)
    pb1, pb2 = linear(sub, w_bond).split(wb + wa, dim=1)
    pa = linear(atom, torch.cat([bc.w_atom, au.w_atom]))
    pre = linear(angle, torch.cat([bc.w_angle, au.w_angle]), torch.cat([bc.bias, au.bias]))
    pre.add_(pb1.index_select(0, b1)).add_(pb2.index_select(0, b2))
    pre.add_(pa.index_select(0, center))
    pre_bc, pre_au = pre.split([wb, wa], dim=1)

    weight = bw_bg.index_select(0, b1) * bw_bg.index_select(0, b2)
    upd = bc.tail(pre_bc, weight)
    new_bond = add_rows(bond, rows, bc.mlp_out, segment_sum(upd, b1, sub.shape[0]))
    new_angle = au.tail(pre_au) + angle
    return new_atom, new_bond, new_angle


#: block functions by name (``CHGNet(config, block=...)``)
BLOCKS: dict[str, Block] = {"exact": exact_block, "decoupled": decoupled_block}
