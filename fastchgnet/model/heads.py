"""The ``heads`` model: FastCHGNet's Force and Stress heads on the decoupled backbone.

The exact and decoupled models take forces and stress as derivatives of the energy, so training
on them back-propagates through a gradient (second-order derivatives). Here they are read out of
the final features directly, and a training step needs first-order gradients only:

* **Force head** (FastCHGNet Eq. 7): every directed bond ``i -> j`` (all bonds of the 6 Å atom
  graph) gets a scalar ``s_ij = MLP([v_i, e_ij, v_j]) * env(r_ij / r_c)``, and
  ``F_i = sum_j s_ij x_ij`` with ``x_ij`` the unit vector from atom ``i`` to its neighbour ``j``.
  The MLP's first layer is packed as in the convolutions (one GEMM per atom, one per bond,
  gathers per direction). The smooth envelope makes the forces continuous when a neighbour
  crosses the cutoff. ``s_ij != s_ji`` in general, so the direct forces of a structure need not
  sum to zero; with ``config.remove_net_force`` (default) each structure's mean force is
  subtracted (exact momentum conservation, as DFT forces).
* **Pair-energy force head**, ``force_head="pair"`` or ``"pair+direct"`` (ours, not in the
  paper): every bond gets coefficients ``c_b`` from the features and a pair energy
  ``phi_b(r) = env(r/rc) sum_k c_bk sin(k pi r/rc)`` that is added to the energy. Its forces
  ``-dphi/dr`` and its virial are written out with the coefficients held fixed (no gradient
  taken), so the force labels train part of the energy. ``"pair+direct"`` adds the Eq. 7 forces.
* **Stress head**, ``stress_head="lattice"`` (FastCHGNet Eq. 9): each atom gives 6 numbers
  ``MLP(v_i)``; their mean over the structure weights the 6 symmetric products of the
  normalised lattice vectors ``a_k / |a_k|``:
  ``sigma = sum_k c_kk a_k (x) a_k + sum_{k<l} c_kl (a_k (x) a_l + a_l (x) a_k) / 2`` (GPa).
  ``stress_head="virial"`` (the default) instead sums a learnt pair virial over the bonds,
  ``sigma = (1/V) sum_b t_b r_b (x) r_b / |r_b| * env``, which does not depend on the choice of
  lattice vectors (two cells of the same crystal give the same stress) and had 1.4-1.9x lower
  stress errors than Eq. 9 in our accuracy runs (docs/models.md).

Both heads are rotation-equivariant (``F -> R F``, ``sigma -> R sigma R^T``), and translation
and permutation invariant; the stress is symmetric by construction. Energy and magnetic moments
are those of the backbone. The backbone's parameters have the names of the exact model, so a
heads model can start from exact (e.g. 0.3.0) weights; the heads then start from their
initialisation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastchgnet.data.batch import Batch
from fastchgnet.model.backbone import Features
from fastchgnet.model.config import CHGNetConfig
from fastchgnet.model.exact import CHGNet
from fastchgnet.model.outputs import Terms, bond_forces, virial_stress
from fastchgnet.nn.functional import envelope, envelope_derivative
from fastchgnet.nn.scatter import segment_sum

__all__ = ["DirectHeads", "ForceHead", "HeadsCHGNet", "LatticeStressHead", "PairEnergyHead",
           "VirialStressHead", "make_heads"]


class _PairMLP(nn.Module):
    """``MLP([v_i, e_ij, v_j]) -> scalar`` for both directions of every undirected bond, with the
    first layer packed: one GEMM over the atoms (centre and neighbour parts), one over the bonds.
    ``symmetric=True`` feeds ``v_i + v_j`` instead, so both directions get the same value."""

    def __init__(self, atom_dim: int, bond_dim: int, hidden: int, symmetric: bool = False,
                 out_dim: int = 1) -> None:
        super().__init__()
        self.hidden = hidden
        self.out_dim = out_dim
        self.symmetric = symmetric
        n_atom_parts = 1 if symmetric else 2
        fan_in = n_atom_parts * atom_dim + bond_dim
        self.w_atom = nn.Parameter(torch.empty(n_atom_parts * hidden, atom_dim))
        self.w_bond = nn.Parameter(torch.empty(hidden, bond_dim))
        self.bias = nn.Parameter(torch.zeros(hidden))
        for p in (self.w_atom, self.w_bond):
            nn.init.uniform_(p, -fan_in ** -0.5, fan_in ** -0.5)
        self.hidden2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, out_dim)

    def _tail(self, pre: Tensor) -> Tensor:
        y = self.out(F.silu(self.hidden2(F.silu(pre))))
        return y.squeeze(-1) if self.out_dim == 1 else y

    def forward(self, atom: Tensor, bond: Tensor, src: Tensor, dst: Tensor) -> Tensor:
        """(n_bonds,) scalars if symmetric, else (2, n_bonds): row 0 for ``src -> dst`` (centre
        ``src``), row 1 for ``dst -> src``; with ``out_dim > 1`` a last axis of that size."""
        q = torch.addmm(self.bias, bond, self.w_bond.t())  # (n_bonds, h)
        p = atom @ self.w_atom.t()
        if self.symmetric:
            return self._tail(q + p.index_select(0, src) + p.index_select(0, dst))
        p_c, p_n = p.split(self.hidden, dim=1)
        fwd = p_c.index_select(0, src) + p_n.index_select(0, dst)
        rev = p_c.index_select(0, dst) + p_n.index_select(0, src)
        return self._tail(torch.stack([fwd, rev]) + q)


class ForceHead(nn.Module):
    """Direct forces ``F_i = sum_j s_ij x_ij`` over the atom graph (FastCHGNet Eq. 7)."""

    def __init__(self, atom_dim: int, bond_dim: int, hidden: int) -> None:
        super().__init__()
        self.pair = _PairMLP(atom_dim, bond_dim, hidden)

    def forward(self, atom: Tensor, bond: Tensor, unit: Tensor, env: Tensor, batch: Batch) -> Tensor:
        s = self.pair(atom, bond, batch.bond_src, batch.bond_dst) * env  # (2, n_bonds)
        # the bond vector points from dst to src (``x_src - x_dst - shift``): the unit vector
        # from src to its neighbour is -unit, from dst to its neighbour +unit
        f = torch.zeros_like(batch.positions)
        f = f.index_add(0, batch.bond_src, -s[0, :, None] * unit)
        return f.index_add(0, batch.bond_dst, s[1, :, None] * unit)


class PairEnergyHead(nn.Module):
    """A learnt pair energy whose partial derivative gives forces and a virial, without autograd.

    Every undirected bond of the atom graph gets ``K`` coefficients ``c_b`` (the mean of
    ``MLP([v_i, e_ij, v_j])`` over both directions) and the energy
    ``phi_b(r) = env(r/rc) sum_k c_bk sin(k pi r/rc)``. The structure's energy gains
    ``sum_b phi_b(r_b)``; the forces gain ``-d/dx`` of it and the stress its virial, both with
    the coefficients held fixed (``dphi/dr`` is written out, so no gradient is taken). The force
    labels therefore train coefficients that also make up part of the energy.
    """

    def __init__(self, atom_dim: int, bond_dim: int, hidden: int, n_basis: int, cutoff: float,
                 p: int) -> None:
        super().__init__()
        self.pair = _PairMLP(atom_dim, bond_dim, hidden, out_dim=n_basis)
        self.cutoff, self.p = float(cutoff), int(p)
        self.register_buffer("freq", torch.arange(1, n_basis + 1) * math.pi, persistent=False)

    def forward(self, atom: Tensor, bond: Tensor, length: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """Per-bond ``phi`` and ``dphi/dr`` (n_bonds,) each."""
        coef = self.pair(atom, bond, batch.bond_src, batch.bond_dst).mean(0)  # (n_bonds, K)
        x = (length / self.cutoff)[:, None]
        freq = self.freq.to(x.dtype)
        w = freq * x
        env, denv = envelope(x, self.p), envelope_derivative(x, self.p)
        g = (coef * torch.sin(w)).sum(1, keepdim=True)
        dg = (coef * torch.cos(w) * freq).sum(1, keepdim=True)  # d g / dx
        phi = (env * g).squeeze(1)
        dphi = ((denv * g + env * dg) / self.cutoff).squeeze(1)
        return phi, dphi


# index pairs (k, l) of the 6 symmetric lattice-vector products
_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


class LatticeStressHead(nn.Module):
    """Stress from per-atom MLP outputs and normalised lattice-vector products (FastCHGNet Eq. 9)."""

    def __init__(self, atom_dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(atom_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, len(_PAIRS)))
        k, l_ = zip(*_PAIRS)
        self.register_buffer("_k", torch.tensor(k), persistent=False)
        self.register_buffer("_l", torch.tensor(l_), persistent=False)

    def forward(self, atom: Tensor, batch: Batch, **_: Any) -> Tensor:
        per_atom = self.mlp(atom)  # (n_atoms, 6)
        n = batch.n_atoms.to(per_atom.dtype)
        coef = segment_sum(per_atom, batch.atom_graph, batch.num_graphs) / n[:, None]
        a = batch.lattice / torch.linalg.vector_norm(batch.lattice, dim=2, keepdim=True)
        ak, al = a.index_select(1, self._k), a.index_select(1, self._l)  # (n_graphs, 6, 3)
        outer = ak.unsqueeze(3) * al.unsqueeze(2)  # (n_graphs, 6, 3, 3)
        sym = 0.5 * (outer + outer.transpose(2, 3))
        return torch.einsum("gp,gpij->gij", coef.to(sym.dtype), sym)


class VirialStressHead(nn.Module):
    """Stress as a learnt pair virial ``(1/V) sum_b t_b r_b (x) r_b / |r_b|`` (cell-choice free)."""

    def __init__(self, atom_dim: int, bond_dim: int, hidden: int) -> None:
        super().__init__()
        self.pair = _PairMLP(atom_dim, bond_dim, hidden, symmetric=True)

    def forward(self, atom: Tensor, batch: Batch, *, bond: Tensor, unit: Tensor, length: Tensor,
                env: Tensor) -> Tensor:
        t = self.pair(atom, bond, batch.bond_src, batch.bond_dst) * env * length  # (n_bonds,)
        return virial_stress(batch, (t[:, None, None] * unit.unsqueeze(2)) * unit.unsqueeze(1))


def make_heads(c: CHGNetConfig) -> tuple[ForceHead | None, PairEnergyHead | None, nn.Module]:
    """The force head, pair-energy head and stress head that ``c.force_head`` and
    ``c.stress_head`` ask for (None where a head is not used)."""
    A, B, H = c.atom_fea_dim, c.bond_fea_dim, c.head_hidden_dim
    force = ForceHead(A, B, H) if c.force_head != "pair" else None
    pair = (PairEnergyHead(A, B, H, c.pair_energy_basis, c.atom_graph_cutoff, c.cutoff_coeff)
            if c.force_head != "direct" else None)
    stress = LatticeStressHead(A, H) if c.stress_head == "lattice" else VirialStressHead(A, B, H)
    return force, pair, stress


class DirectHeads:
    """Output stage: forces and stress from the heads; no gradient of the energy is taken.

    ``config.force_head``: ``"direct"`` (Eq. 7), ``"pair"`` (the pair energy's forces) or
    ``"pair+direct"``; ``config.stress_head``: ``"virial"`` or ``"lattice"`` (Eq. 9). The pair
    energy, when used, is added to the energy and, half to each atom, to the site energies.
    """

    needs_energy_gradient = False

    def __init__(self, config: CHGNetConfig) -> None:
        self.config = config
        self.force_head, self.pair_energy, self.stress_head = make_heads(config)

    def modules(self) -> dict[str, nn.Module]:
        named = {"force_head": self.force_head, "pair_energy": self.pair_energy,
                 "stress_head": self.stress_head}
        return {k: v for k, v in named.items() if v is not None}

    def __call__(self, batch: Batch, vec: Tensor, feats: Features, want_f: bool, want_s: bool,
                 create_graph: bool) -> Terms:
        c = self.config
        atom, bond, length, unit = feats.atom, feats.bond, feats.length, feats.unit
        terms = Terms(feats.energy, feats.site)
        dphi = None
        if self.pair_energy is not None:
            phi, dphi = self.pair_energy(atom, bond, length, batch)
            half = 0.5 * phi
            terms.site = terms.site.index_add(0, batch.bond_src, half).index_add(0, batch.bond_dst, half)
            terms.energy = terms.energy + segment_sum(phi, batch.bond_graph, batch.num_graphs)
        if not (want_f or want_s):
            return terms
        env = envelope(length / c.atom_graph_cutoff, c.cutoff_coeff)
        if want_f:
            f = (self.force_head(atom, bond, unit, env, batch) if self.force_head is not None
                 else torch.zeros_like(batch.positions))
            if dphi is not None:  # -d/dx of sum_b phi_b(r_b): ``unit`` points from dst to src
                f = bond_forces(batch, dphi[:, None] * unit, f)
            if c.remove_net_force:
                n = batch.n_atoms.to(f.dtype)
                net = segment_sum(f, batch.atom_graph, batch.num_graphs) / n[:, None]
                f = f - net.index_select(0, batch.atom_graph)
            terms.forces = f
        if want_s:
            s = self.stress_head(atom, batch, bond=bond, unit=unit, length=length, env=env)
            if dphi is not None:  # the pair energy's virial, as the exact model's
                s = s + virial_stress(batch, (dphi * length)[:, None, None] * unit.unsqueeze(2)
                                      * unit.unsqueeze(1))
            terms.stress = s
        return terms


class HeadsCHGNet(CHGNet):
    """Decoupled CHGNet with direct Force and Stress heads (``model_type = "heads"``): the
    decoupled block and the :class:`DirectHeads` output stage.

    Forces and stress need no gradient of the energy, so ``create_graph`` has no effect and a
    prediction of any task can run under ``torch.no_grad()``.
    """

    model_type = "heads"

    def __init__(self, config: CHGNetConfig | None = None, **overrides: Any) -> None:
        config = CHGNetConfig.with_overrides(config, **overrides)
        super().__init__(config, block="decoupled", output=DirectHeads(config))
