"""Output stages: from the backbone's features to energy, forces and stress.

An output stage is what a model variant puts after its backbone (as nequip's
``ForceStressOutput`` and MACE's ``get_outputs``):

* :class:`AutogradForceStress` — forces and stress as derivatives of the energy, from one
  gradient with respect to the bond vectors (the ``exact`` and ``decoupled`` models);
* :class:`~fastchgnet.model.heads.DirectHeads` — forces and stress read out of the final
  features by the Force/Stress heads, with no gradient of the energy (the ``heads`` model).

A stage is called as ``stage(batch, vec, feats, want_f, want_s, create_graph)`` and returns
:class:`Terms`. Its learnable modules (``modules``) are registered on the model under their own
names, so state_dict keys do not depend on the stage.

With the graph fixed, the energy depends on positions ``x`` and lattice ``L`` only through the bond
vectors ``r_u = x_src - x_dst - n_u L``. With ``g_u = dE/dr_u``:
``F_i = -sum_{src(u)=i} g_u + sum_{dst(u)=i} g_u`` and ``sigma = (1/V) sum_u r_u (x) g_u``, the
same as ``-dE/dx`` and ``(1/V) dE/d(strain)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastchgnet.data.batch import Batch
from fastchgnet.model.backbone import Features
from fastchgnet.nn.linear import input_gradients_only
from fastchgnet.nn.scatter import segment_sum
from fastchgnet.units import EV_A3_TO_GPA

__all__ = ["AutogradForceStress", "Terms", "bond_forces", "cell_volume",
           "virial_stress"]


@dataclass
class Terms:
    """What an output stage returns."""

    energy: Tensor  # (n_graphs,) eV, without the AtomRef
    site: Tensor  # (n_atoms,) eV, site energies without the AtomRef
    forces: Tensor | None = None  # (n_atoms, 3) eV/Å
    stress: Tensor | None = None  # (n_graphs, 3, 3) GPa


def cell_volume(lattice: Tensor) -> Tensor:
    """(n_graphs,) volumes (Å^3) of (n_graphs, 3, 3) lattices: ``|a · (b × c)|`` (the triple
    product, not ``linalg.det``, which AOTInductor has no native kernel for)."""
    a, b, c = lattice.unbind(1)
    return (a * torch.linalg.cross(b, c, dim=1)).sum(dim=1).abs()


def bond_forces(batch: Batch, g: Tensor, forces: Tensor | None = None) -> Tensor:
    """Forces (n_atoms, 3) of per-bond energy gradients ``g = dE/dr`` (n_bonds, 3), added to
    ``forces`` when given: ``-g`` on each bond's src atom, ``+g`` on its dst atom."""
    f = torch.zeros_like(batch.positions) if forces is None else forces
    return f.index_add(0, batch.bond_src, -g).index_add(0, batch.bond_dst, g)


def virial_stress(batch: Batch, vir: Tensor) -> Tensor:
    """Stress (n_graphs, 3, 3) GPa of per-bond virials ``vir`` (n_bonds, 3, 3) eV: summed per
    structure and divided by the cell volume."""
    s = segment_sum(vir, batch.bond_graph, batch.num_graphs)
    return s * (EV_A3_TO_GPA / cell_volume(batch.lattice))[:, None, None]


class AutogradForceStress:
    """Forces and stress as derivatives of the energy (one gradient w.r.t. the bond vectors)."""

    #: the energy must be differentiated (the model enables grad on the bond vectors)
    needs_energy_gradient = True

    def modules(self) -> dict[str, nn.Module]:
        return {}

    def __call__(self, batch: Batch, vec: Tensor, feats: Features, want_f: bool, want_s: bool,
                 create_graph: bool) -> Terms:
        if not (want_f or want_s):
            return Terms(feats.energy, feats.site)
        with input_gradients_only():  # the weights' gradients are not asked for here
            (g,) = torch.autograd.grad(feats.energy.sum(), vec, create_graph=create_graph)
        return self.terms(batch, vec, feats, g, want_f, want_s)

    @staticmethod
    def terms(batch: Batch, vec: Tensor, feats: Features, g: Tensor, want_f: bool,
              want_s: bool) -> Terms:
        """The terms of the gradient ``g = dE/dvec`` (n_bonds, 3) however it was taken."""
        terms = Terms(feats.energy, feats.site)
        if want_f:
            terms.forces = bond_forces(batch, g)
        if want_s:
            terms.stress = virial_stress(batch, vec.detach().unsqueeze(2) * g.unsqueeze(1))
        return terms
