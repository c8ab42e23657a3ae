"""The CHGNet backbone: from a batch's bond vectors to site energies and final features.

For a whole :class:`~fastchgnet.data.batch.Batch` (no per-structure loop, no host sync):

1. lengths and unit vectors of the undirected bond vectors;
2. both radial bases (6 Å and 3 Å) and the angle basis, each in one pass over the batch;
3. embeddings; ``n_conv - 1`` interaction blocks (a function from :mod:`fastchgnet.model.blocks`:
   exact or decoupled); magnetic moments from the atom features after the last block;
4. a final atom convolution, the readout LayerNorm and the per-site MLP: site energies, summed
   per structure (without the AtomRef, which the model adds).

What comes after the backbone — forces and stress, by autograd or from heads — is the model's
output stage (:mod:`fastchgnet.model.outputs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from fastchgnet.data.batch import Batch
from fastchgnet.model.blocks import Block
from fastchgnet.model.config import CHGNetConfig
from fastchgnet.nn import fused
from fastchgnet.nn.basis import FourierAngle, RadialBessel
from fastchgnet.nn.layers import MLP, AngleUpdate, AtomConv, BondConv
from fastchgnet.nn.linear import linear
from fastchgnet.nn.scatter import segment_sum

__all__ = ["Backbone", "Features"]


@dataclass
class Features:
    """What the backbone computes for one batch (the output stage's input)."""

    energy: Tensor  # (n_graphs,) eV, sum of the site energies, without the AtomRef
    site: Tensor  # (n_atoms,) eV, site energies without the AtomRef
    atom: Tensor  # (n_atoms, A) final atom features (after the readout LayerNorm)
    bond: Tensor  # (n_bonds, B) bond features after the last interaction block
    length: Tensor  # (n_bonds,) Å, bond lengths
    unit: Tensor  # (n_bonds, 3) unit bond vectors, pointing from dst to src
    magmom: Tensor | None = None  # (n_atoms,) μB, when asked for
    atom_fea: Tensor | None = None  # (n_atoms, A) atom features after the last block, when asked for


class Backbone(nn.Module):
    """Embeddings, interaction blocks and readout of CHGNet (the parameters of every variant).

    ``block`` is the interaction block function (:data:`fastchgnet.model.blocks.BLOCKS`). The
    parameter names are those of the ``exact`` model for every block, so weights move between
    variants unchanged.
    """

    def __init__(self, config: CHGNetConfig, block: Block) -> None:
        super().__init__()
        self.config = c = config
        self.block = block
        #: the compiled block function used instead of ``block`` when the pass is not
        #: differentiated twice; set by :func:`fastchgnet.compile.compile_blocks`
        self.compiled_block: Callable[..., Any] | None = None
        A, B, G = c.atom_fea_dim, c.bond_fea_dim, c.angle_fea_dim
        norm = c.gMLP_norm == "layer"

        self.atom_embedding = nn.Embedding(c.max_num_elements, A)
        self.rbf_ag = RadialBessel(c.num_radial, c.atom_graph_cutoff, c.cutoff_coeff, c.learnable_rbf)
        self.rbf_bg = RadialBessel(c.num_radial, c.bond_graph_cutoff, c.cutoff_coeff, c.learnable_rbf)
        self.angle_basis = FourierAngle(c.num_angular, c.learnable_rbf)
        # bond embedding and 6 Å bond weights share their input: one packed GEMM
        self.bond_embed_ag = nn.Linear(c.num_radial, B + A, bias=False)
        self.bond_weights_bg = nn.Linear(c.num_radial, B, bias=False)
        self.angle_embedding = nn.Linear(c.num_angular, G, bias=False)

        self.atom_convs = nn.ModuleList(
            AtomConv(A, B, c.atom_conv_hidden_dim, norm, c.mlp_out_bias) for _ in range(c.n_conv)
        )
        self.bond_convs = nn.ModuleList(
            BondConv(A, B, G, c.bond_conv_hidden_dim, B, norm, True, c.mlp_out_bias)
            for _ in range(c.n_conv - 1 if c.update_bond else 0)
        )
        self.angle_updates = nn.ModuleList(
            AngleUpdate(A, B, G, c.angle_layer_hidden_dim, norm)
            for _ in range(c.n_conv - 1 if c.update_angle else 0)
        )
        self.site_wise = nn.Linear(A, 1)
        self.readout_norm = nn.LayerNorm(A) if c.readout_norm == "layer" else None
        self.readout = MLP(A, list(c.mlp_hidden_dims), 1)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def graph_kwargs(self) -> dict[str, float]:
        """The graph-building options this model needs (cutoffs, largest atomic number)."""
        return {"atom_cutoff": self.config.atom_graph_cutoff,
                "bond_cutoff": self.config.bond_graph_cutoff,
                "max_atomic_number": self.config.max_num_elements}

    def bond_vectors(self, batch: Batch) -> Tensor:
        """(n_bonds, 3) vectors ``x_src - x_dst - image @ lattice`` of the undirected bonds."""
        lat = batch.lattice.index_select(0, batch.bond_graph)
        shift = torch.bmm(batch.bond_image.unsqueeze(1), lat).squeeze(1)
        pos = batch.positions
        return pos.index_select(0, batch.bond_src) - pos.index_select(0, batch.bond_dst) - shift

    def radial_bases(self, length: Tensor) -> tuple[Tensor, Tensor]:
        """Both radial bases (6 Å and 3 Å) of the bond lengths, fused in one pass when possible."""
        a, b = self.rbf_ag, self.rbf_bg
        if a.envelope_p == b.envelope_p:
            return fused.radial_bases(length, a.frequencies, b.frequencies, a.cutoff, b.cutoff,
                                      a.envelope_p)
        return a(length), b(length)

    def interaction(self, i: int, atom: Tensor, bond: Tensor, angle: Tensor, bw_ag: Tensor,
                    bw_bg: Tensor, src_dir: Tensor, dst_dir: Tensor, center: Tensor, b1: Tensor,
                    b2: Tensor, update_angle: bool = True,
                    rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Interaction block ``i`` (the eager block function)."""
        return self.block(self, i, atom, bond, angle, bw_ag, bw_bg, src_dir, dst_dir, center, b1,
                          b2, update_angle, rows)

    def features(self, batch: Batch, vec: Tensor, *, want_m: bool = False,
                 want_atom_fea: bool = False, compiled: bool = True) -> Features:
        """Run the backbone on the bond vectors ``vec`` (n_bonds, 3) of ``batch``.

        ``compiled=False`` runs the eager blocks even when compiled ones are set (a pass that is
        differentiated twice: AOTAutograd's compiled backward cannot itself be differentiated).
        """
        c = self.config
        src, dst = batch.bond_src, batch.bond_dst
        center, b1, b2 = batch.angle_center, batch.angle_bond1, batch.angle_bond2
        src_dir = torch.cat([src, dst])  # centre atom of each directed bond
        dst_dir = torch.cat([dst, src])  # its neighbour

        # --- bases of the whole batch in one pass -------------------------------------------
        length = torch.linalg.vector_norm(vec, dim=1)
        unit = vec / length[:, None]
        rbf_ag, rbf_bg = self.radial_bases(length)
        abasis = self.angle_basis(unit, b1, b2, batch.angle_sign)

        # --- embeddings -----------------------------------------------------------------------
        atom = self.atom_embedding(batch.atomic_numbers - 1)
        bond, bw_ag = linear(rbf_ag, self.bond_embed_ag.weight).split(
            [c.bond_fea_dim, c.atom_fea_dim], dim=1)
        # the bond and angle updates only read the bonds the angles use (within 3 Å, about a
        # tenth of the bonds): when the batch lists them, run those updates on these rows only
        rows = batch.angle_rows
        if rows is not None:
            b1, b2 = batch.angle_row1, batch.angle_row2
            rbf_bg = rbf_bg.index_select(0, rows)
        bw_bg = linear(rbf_bg, self.bond_weights_bg.weight)
        angle = linear(abasis, self.angle_embedding.weight)

        block = self.interaction
        if self.compiled_block is not None and compiled:
            block = self.compiled_block
        n_blocks = c.n_conv - 1
        for i in range(n_blocks):
            # the angle features of the last block are never read: skip that update
            atom, bond, angle = block(i, atom, bond, angle, bw_ag, bw_bg, src_dir, dst_dir,
                                      center, b1, b2, update_angle=i < n_blocks - 1, rows=rows)
        magmom = self.site_wise(atom).abs().squeeze(1) if want_m else None
        atom_fea = atom if want_atom_fea else None

        atom = self.atom_convs[-1](atom, bond, bw_ag, src_dir, dst_dir)
        if self.readout_norm is not None:
            atom = self.readout_norm(atom)
        site = self.readout(atom).squeeze(1)
        return Features(energy=segment_sum(site, batch.atom_graph, batch.num_graphs), site=site,
                        atom=atom, bond=bond, length=length, unit=unit, magmom=magmom,
                        atom_fea=atom_fea)
