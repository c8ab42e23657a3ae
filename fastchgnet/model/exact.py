"""The ``exact`` model: the mathematics of CHGNet 0.3.0 on batched graphs.

Forward pass for a whole :class:`~fastchgnet.data.batch.Batch` (no per-structure loop, no host
sync):

1. bond vectors of all undirected bonds, ``r = x_src - x_dst - n @ L``; lengths and unit vectors;
2. both radial bases (6 Å and 3 Å) and the angle basis, each in one pass over the batch;
3. embeddings; ``n_conv`` interaction blocks (atom conv, bond conv, angle update);
   magnetic moments from the atom features after block ``n_conv - 1``;
4. per-site readout MLP, summed per structure; AtomRef composition energy;
5. forces and stress from one gradient with respect to the bond vectors:
   ``F_i = -sum_{bonds at i} dE/dr`` (with sign by direction) and
   ``sigma = (1/V) sum_bonds r (x) dE/dr`` — the same as ``-dE/dx`` and ``(1/V) dE/d(strain)``
   because the energy depends on positions and lattice only through the bond vectors.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

import fastchgnet.kernels as kernels
from fastchgnet.data.batch import Batch
from fastchgnet.model.config import CHGNetConfig
from fastchgnet.nn.basis import FourierAngle, RadialBessel
from fastchgnet.nn.layers import MLP, AngleUpdate, AtomConv, BondConv

EV_A3_TO_GPA = 160.21766208  # eV/Å^3 -> GPa (the reference's constant)
VALID_TASKS = ("e", "ef", "em", "efs", "efsm", "es", "esm", "efm")


def cell_volume(lattice: Tensor) -> Tensor:
    """(n_graphs,) volumes (Å^3) of (n_graphs, 3, 3) lattices: ``|a · (b × c)|`` (the triple
    product, not ``linalg.det``, which AOTInductor has no native kernel for)."""
    a, b, c = lattice.unbind(1)
    return (a * torch.linalg.cross(b, c, dim=1)).sum(dim=1).abs()


def check_task(task: str) -> None:
    if task not in VALID_TASKS:
        raise ValueError(f"invalid task {task!r}; use one of {VALID_TASKS}")


class CHGNet(nn.Module):
    """CHGNet with the reference's mathematics (``model_type = "exact"``).

    Build with a :class:`CHGNetConfig` (or keyword overrides of it); load published weights with
    :func:`fastchgnet.load_model`.
    """

    model_type = "exact"

    def __init__(self, config: CHGNetConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None:
            config = CHGNetConfig(**overrides)
        elif overrides:
            config = CHGNetConfig.from_dict({**config.to_dict(), **overrides})
        self.config = c = config
        self.version: str | None = None
        self._compiled_interaction: Any = None  # set by fastchgnet.model.compile.compile_blocks
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
        # AtomRef: per-element reference energy (eV/atom); fixed, fitted outside the network
        self.atom_ref = nn.Parameter(torch.zeros(c.max_num_elements), requires_grad=False)
        if c.composition_model is None:
            self.atom_ref = None  # type: ignore[assignment]

    # ------------------------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def radial_bases(self, length: Tensor) -> tuple[Tensor, Tensor]:
        """Both radial bases (6 Å and 3 Å) of the bond lengths, fused in one pass when possible."""
        a, b = self.rbf_ag, self.rbf_bg
        if a.envelope_p == b.envelope_p:
            return kernels.radial_bases(length, a.frequencies, b.frequencies, a.cutoff, b.cutoff,
                                        a.envelope_p)
        return a(length), b(length)

    def bond_vectors(self, batch: Batch) -> Tensor:
        """(n_bonds, 3) vectors ``x_src - x_dst - image @ lattice`` of the undirected bonds."""
        lat = batch.lattice.index_select(0, batch.bond_graph)
        shift = torch.bmm(batch.bond_image.unsqueeze(1), lat).squeeze(1)
        pos = batch.positions
        return pos.index_select(0, batch.bond_src) - pos.index_select(0, batch.bond_dst) - shift

    def forward(
        self,
        batch: Batch,
        task: str = "e",
        *,
        create_graph: bool | None = None,
        return_site_energies: bool = False,
        return_crystal_feas: bool = False,
        return_atom_feas: bool = False,
    ) -> dict[str, Tensor]:
        """Predict for a batch.

        Returns a dict of batch tensors: ``e`` (n_graphs,) eV/atom, ``f`` (n_atoms, 3) eV/Å,
        ``s`` (n_graphs, 3, 3) GPa, ``m`` (n_atoms,) μB, and on request ``site_energies``
        (n_atoms,) eV, ``crystal_fea`` (n_graphs, atom_fea_dim), ``atom_fea`` (n_atoms, atom_fea_dim).

        ``create_graph`` (default: ``self.training``) keeps the graph of the force/stress gradient so
        a loss on them can be back-propagated (second-order derivatives).
        """
        check_task(task)
        want_f, want_s, want_m = "f" in task, "s" in task, "m" in task
        if create_graph is None:
            create_graph = self.training
        by_grad = self.forces_by_autograd and (want_f or want_s)
        with torch.enable_grad() if by_grad else nullcontext():
            vec = self.bond_vectors(batch)
            if by_grad and not vec.requires_grad:
                vec.requires_grad_(True)
            keep = ((want_f or want_s) and not by_grad) or self.head_energy_terms
            out = self._energy(batch, vec, want_m, return_site_energies, return_crystal_feas,
                               return_atom_feas, keep_features=keep,
                               # compiled blocks cannot be differentiated twice: eager then
                               compiled_blocks=not (by_grad and create_graph))
            energy = out.pop("_total")  # (n_graphs,) eV, without the AtomRef part
            if self.head_energy_terms:
                energy = self.head_energy(batch, energy, out)
            if want_f or want_s:
                self.forces_stress(batch, vec, energy, out, want_f, want_s, create_graph)
        for key in [k for k in out if k.startswith("_")]:
            del out[key]
        n_atoms = batch.n_atoms.to(energy.dtype)
        e = energy / n_atoms if self.config.is_intensive else energy
        if self.atom_ref is not None:
            ref = self.atom_ref.index_select(0, batch.atomic_numbers - 1)
            comp = ref.new_zeros(batch.num_graphs).index_add(0, batch.atom_graph, ref)
            e = e + (comp / n_atoms if self.config.is_intensive else comp)
            if return_site_energies:
                out["site_energies"] = out["site_energies"] + ref
        out["e"] = e
        return out

    #: forces and stress as derivatives of the energy (False: from output heads)
    forces_by_autograd = True
    #: an output head adds to the energy (:meth:`head_energy`; the heads model's pair energy)
    head_energy_terms = False

    def head_energy(self, batch: Batch, energy: Tensor, out: dict[str, Tensor]) -> Tensor:
        """``energy`` (n_graphs,) eV plus the output heads' share (none here)."""
        return energy

    def forces_stress(self, batch: Batch, vec: Tensor, energy: Tensor, out: dict[str, Tensor],
                      want_f: bool, want_s: bool, create_graph: bool) -> None:
        """Put ``f`` (n_atoms, 3) eV/Å and/or ``s`` (n_graphs, 3, 3) GPa into ``out``: one gradient
        of the total energy with respect to the bond vectors."""
        (grad,) = torch.autograd.grad(energy.sum(), vec, create_graph=create_graph)
        if want_f:
            f = torch.zeros_like(batch.positions)
            out["f"] = f.index_add(0, batch.bond_src, -grad).index_add(0, batch.bond_dst, grad)
        if want_s:
            vir = vec.detach().unsqueeze(2) * grad.unsqueeze(1)  # (n_bonds, 3, 3)
            s = vir.new_zeros(batch.num_graphs, 3, 3).index_add(0, batch.bond_graph, vir)
            out["s"] = s * (EV_A3_TO_GPA / cell_volume(batch.lattice))[:, None, None]

    def _energy(self, batch: Batch, vec: Tensor, want_m: bool, want_site: bool,
                want_crystal: bool, want_atom_fea: bool,
                keep_features: bool = False, compiled_blocks: bool = True) -> dict[str, Tensor]:
        """Energy (``_total``, eV, no AtomRef) and requested outputs; ``keep_features`` adds the
        final features and geometry for output heads (``_atom``, ``_bond``, ``_length``, ``_unit``)."""
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
        bond, bw_ag = self.bond_embed_ag(rbf_ag).split([c.bond_fea_dim, c.atom_fea_dim], dim=1)
        bw_bg = self.bond_weights_bg(rbf_bg)
        angle = self.angle_embedding(abasis)

        out: dict[str, Tensor] = {}
        n_blocks = c.n_conv - 1
        block = self.interaction
        if self._compiled_interaction is not None and compiled_blocks:
            block = self._compiled_interaction
        for i in range(n_blocks):
            # the angle features of the last block are never read: skip that update
            atom, bond, angle = block(i, atom, bond, angle, bw_ag, bw_bg, src_dir, dst_dir,
                                                 center, b1, b2, update_angle=i < n_blocks - 1)
            if i == n_blocks - 1:
                if want_atom_fea:
                    out["atom_fea"] = atom
                if want_m:
                    out["m"] = self.site_wise(atom).abs().squeeze(1)
        if n_blocks == 0 and want_m:
            out["m"] = self.site_wise(atom).abs().squeeze(1)
        atom = self.atom_convs[-1](atom, bond, bw_ag, src_dir, dst_dir)
        if self.readout_norm is not None:
            atom = self.readout_norm(atom)
        site = self.readout(atom).squeeze(1)
        out["_total"] = site.new_zeros(batch.num_graphs).index_add(0, batch.atom_graph, site)
        if keep_features:
            out.update(_atom=atom, _bond=bond, _length=length, _unit=unit)
        if want_site:
            out["site_energies"] = site
        if want_crystal:
            out["crystal_fea"] = atom.new_zeros(batch.num_graphs, atom.shape[1]).index_add(
                0, batch.atom_graph, atom)
        return out

    def interaction(self, i: int, atom: Tensor, bond: Tensor, angle: Tensor, bw_ag: Tensor,
                    bw_bg: Tensor, src_dir: Tensor, dst_dir: Tensor, center: Tensor, b1: Tensor,
                    b2: Tensor, update_angle: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Interaction block ``i`` (CHGNet's order): atom conv, then the bond conv reads the new
        atom features, then the angle update reads the new atom and bond features."""
        c = self.config
        atom = self.atom_convs[i](atom, bond, bw_ag, src_dir, dst_dir)
        new_bond = self.bond_convs[i](atom, bond, bw_bg, angle, center, b1, b2) if c.update_bond else bond
        if c.update_angle and update_angle:
            angle = self.angle_updates[i](atom, new_bond, angle, center, b1, b2)
        return atom, new_bond, angle

    # ------------------------------------------------------------------------------------------
    def predict(self, structures: Any, task: str = "efsm", batch_size: int = 16, **kwargs: Any):
        """Predict for one structure or a list (pymatgen or ASE); see :func:`fastchgnet.predict`."""
        from fastchgnet.model.predict import predict

        return predict(self, structures, task=task, batch_size=batch_size, **kwargs)

    def graph_kwargs(self) -> dict[str, float]:
        return {"atom_cutoff": self.config.atom_graph_cutoff,
                "bond_cutoff": self.config.bond_graph_cutoff,
                "max_atomic_number": self.config.max_num_elements}

