"""Plain-torch building blocks with packed GEMMs.

CHGNet's GatedMLP applies two MLPs (core and gate) to one concatenated input, e.g.
``[h_center, e_bond, h_neighbour]`` per directed bond. A linear layer distributes over the
concatenation, so the first layer is computed per *source* of each part and gathered afterwards:

    W [h_c | e | h_n] + b = (W_c h)[center] + (W_e e)[bond] + (W_n h)[neighbour] + b

The atom features are projected once per atom with ``[W_c; W_n]`` of core and gate packed into one
GEMM (4 x hidden outputs), the bond features once per undirected bond, and only additions happen
per directed bond. This is the same mathematics as the reference in a different summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastchgnet.nn import fused
from fastchgnet.nn.linear import linear
from fastchgnet.nn.scatter import segment_sum


class GatedTail(nn.Module):
    """The part of a GatedMLP after its packed first layer.

    Input: the first layer's pre-activation ``[core | gate]`` of width ``2 * width``. With a hidden
    layer (``hidden > 0``) it applies SiLU and the two second linears (core and gate); then the
    LayerNorms, SiLU(core) * Sigmoid(gate).
    """

    def __init__(self, hidden: int, out_dim: int, norm: bool = True) -> None:
        super().__init__()
        self.hidden = hidden
        self.out_dim = out_dim
        if hidden > 0:
            self.core2 = nn.Linear(hidden, out_dim)
            self.gate2 = nn.Linear(hidden, out_dim)
        self.norm_core = nn.LayerNorm(out_dim) if norm else None
        self.norm_gate = nn.LayerNorm(out_dim) if norm else None

    @property
    def width(self) -> int:
        """Width of each half of the first layer's output."""
        return self.hidden if self.hidden > 0 else self.out_dim

    def forward(self, pre: Tensor, weight: Tensor | None = None) -> Tensor:
        """``weight`` (m, out) multiplies output row ``i`` by ``weight[i % m]`` (fused)."""
        w = self.width
        # split (not two slices): its backward is one concatenation, not two zero-filled copies
        if self.hidden > 0:
            h_core, h_gate = F.silu(pre).split(w, dim=1)
            core = linear(h_core, self.core2.weight, self.core2.bias)
            gate = linear(h_gate, self.gate2.weight, self.gate2.bias)
        else:
            core, gate = pre.split(w, dim=1)
        nc, ng = self.norm_core, self.norm_gate
        if nc is None:
            return fused.gated_epilogue(core, gate, None, None, None, None, 1e-5, weight)
        return fused.gated_epilogue(core, gate, nc.weight, nc.bias, ng.weight, ng.bias, nc.eps,
                                    weight)


class AtomConv(nn.Module):
    """Atom convolution: messages over directed bonds, weighted by the 6 Å bond weights, summed
    onto the centre atom, then a linear (``mlp_out``) and the residual."""

    def __init__(self, atom_dim: int, bond_dim: int, hidden: int, norm: bool = True,
                 out_bias: bool = False) -> None:
        super().__init__()
        self.tail = GatedTail(hidden, atom_dim, norm)
        w = self.tail.width
        # rows: [core | gate] for the centre part, then [core | gate] for the neighbour part
        self.w_atom = nn.Parameter(torch.empty(4 * w, atom_dim))
        self.w_bond = nn.Parameter(torch.empty(2 * w, bond_dim))
        self.bias = nn.Parameter(torch.zeros(2 * w))
        self.mlp_out = nn.Linear(atom_dim, atom_dim, bias=out_bias)
        fan_in = 2 * atom_dim + bond_dim
        for p in (self.w_atom, self.w_bond):
            nn.init.uniform_(p, -fan_in ** -0.5, fan_in ** -0.5)

    def forward(self, atom: Tensor, bond: Tensor, bond_weight: Tensor, src_dir: Tensor,
                dst_dir: Tensor) -> Tensor:
        """``src_dir``/``dst_dir``: (2 n_bonds,) centre and neighbour atom of every directed bond,
        the undirected bonds first, then their reverses (``cat(src, dst)``, ``cat(dst, src)``)."""
        w2 = 2 * self.tail.width
        # (n_atoms, 4w): centre and neighbour parts, core and gate
        p_center, p_nbr = linear(atom, self.w_atom).split(w2, dim=1)
        q = linear(bond, self.w_bond, self.bias)  # (n_bonds, 2w), shared by both directions
        pre = p_center.index_select(0, src_dir) + p_nbr.index_select(0, dst_dir)
        pre = (pre.view(2, -1, w2) + q).view(-1, w2)
        msg = self.tail(pre, bond_weight)  # both directions share their bond's weight row
        new = segment_sum(msg, src_dir, atom.shape[0])
        return linear(new, self.mlp_out.weight, self.mlp_out.bias) + atom


class BondConv(nn.Module):
    """Bond convolution over angles: the update of each angle, weighted by the 3 Å weights of both
    legs, summed onto its first leg, then ``mlp_out`` and the residual."""

    def __init__(self, atom_dim: int, bond_dim: int, angle_dim: int, hidden: int, out_dim: int,
                 norm: bool = True, mlp_out: bool = True, out_bias: bool = False) -> None:
        super().__init__()
        self.tail = GatedTail(hidden, out_dim, norm)
        w = self.tail.width
        self.w_bond = nn.Parameter(torch.empty(4 * w, bond_dim))  # first leg, then second leg
        self.w_angle = nn.Parameter(torch.empty(2 * w, angle_dim))
        self.w_atom = nn.Parameter(torch.empty(2 * w, atom_dim))
        self.bias = nn.Parameter(torch.zeros(2 * w))
        self.mlp_out = nn.Linear(out_dim, out_dim, bias=out_bias) if mlp_out else None
        fan_in = 2 * bond_dim + angle_dim + atom_dim
        for p in (self.w_bond, self.w_angle, self.w_atom):
            nn.init.uniform_(p, -fan_in ** -0.5, fan_in ** -0.5)

    def gated(self, atom: Tensor, bond: Tensor, angle: Tensor, center: Tensor, b1: Tensor,
              b2: Tensor, weight: Tensor | None = None) -> Tensor:
        """GatedMLP of ``[bond[b1], bond[b2], angle, atom[center]]`` per angle."""
        w2 = 2 * self.tail.width
        pb1, pb2 = linear(bond, self.w_bond).split(w2, dim=1)
        pa = linear(atom, self.w_atom)
        pre = linear(angle, self.w_angle, self.bias)
        # in place is safe: additions keep nothing for backward, the products keep only inputs
        pre.add_(pb1.index_select(0, b1)).add_(pb2.index_select(0, b2))
        pre.add_(pa.index_select(0, center))
        return self.tail(pre, weight)

    def forward(self, atom: Tensor, bond: Tensor, bond_weight: Tensor, angle: Tensor,
                center: Tensor, b1: Tensor, b2: Tensor, rows: Tensor | None = None) -> Tensor:
        """``rows``: when given, the bonds the angles use; ``b1``, ``b2`` and ``bond_weight``
        then refer to those rows only, and the other bonds keep their features (their update is
        an empty sum)."""
        sub = bond if rows is None else bond.index_select(0, rows)
        weight = bond_weight.index_select(0, b1) * bond_weight.index_select(0, b2)
        upd = self.gated(atom, sub, angle, center, b1, b2, weight)
        return add_rows(bond, rows, self.mlp_out, segment_sum(upd, b1, sub.shape[0]))


class AngleUpdate(BondConv):
    """Angle update: the GatedMLP of the same inputs as :class:`BondConv`, plus the residual."""

    def __init__(self, atom_dim: int, bond_dim: int, angle_dim: int, hidden: int,
                 norm: bool = True) -> None:
        super().__init__(atom_dim, bond_dim, angle_dim, hidden, angle_dim, norm, mlp_out=False)

    def forward(self, atom: Tensor, bond: Tensor, angle: Tensor, center: Tensor, b1: Tensor,
                b2: Tensor, rows: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """``rows``: as in :meth:`BondConv.forward` (``b1``, ``b2`` index ``bond[rows]``)."""
        sub = bond if rows is None else bond.index_select(0, rows)
        return self.gated(atom, sub, angle, center, b1, b2) + angle


def add_rows(bond: Tensor, rows: Tensor | None, out: nn.Linear | None, summed: Tensor) -> Tensor:
    """``bond + out(summed)`` (the bond convolution's residual), where ``summed`` holds the sums
    of ``bond[rows]`` only (all bonds when ``rows`` is None): the other bonds' sums are zero, so
    they get only the bias."""
    if out is None:
        return summed + bond if rows is None else bond.index_add(0, rows, summed)
    if rows is None:
        return linear(summed, out.weight, out.bias) + bond
    new = bond.index_add(0, rows, linear(summed, out.weight))
    return new if out.bias is None else new + out.bias


class MLP(nn.Sequential):
    """Linear -> SiLU -> ... -> Linear (the readout MLP)."""

    def __init__(self, in_dim: int, hidden: list[int], out_dim: int) -> None:
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.SiLU()]
            d = h
        layers.append(nn.Linear(d, out_dim))
        super().__init__(*layers)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = linear(x, layer.weight, layer.bias) if isinstance(layer, nn.Linear) else layer(x)
        return x
