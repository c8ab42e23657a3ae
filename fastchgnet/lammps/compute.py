"""What one MPI rank computes in each parallel mode (plain numpy/torch, no LAMMPS calls here).

``replicated``: the whole periodic system, identical on every rank (:func:`periodic_terms`).

``local``: a rank's own atoms plus the ghost atoms LAMMPS gives it, as one *non-periodic*
cluster (:func:`cluster_terms`). The site energy e_i of the model depends only on atoms within
its receptive field R = n_conv × atom cutoff (24 Å for CHGNet 0.3.0: each of the n_conv atom
convolutions reaches one 6 Å neighbour further; the bond and angle updates act within 3 Å of an
atom that is already reached). With ghosts out to R from the rank's sub-domain, e_i of every
local atom i is exact in the cluster. The rank differentiates its own energy
E_rank = Σ_{i local} e_i with respect to every cluster atom, local and ghost; the total force on
atom j is the sum, over ranks, of these partial forces on all copies of j (``fix external`` sets
forces of local atoms only, so the driver sums them by atom id with one MPI_Allreduce). Since
E = Σ_rank E_rank and each E_rank depends on positions only through bond vectors r_u, the
virial W = -Σ_u r_u ⊗ ∂E/∂r_u is also the sum over ranks of each rank's own bond sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastchgnet.data.batch import collate
from fastchgnet.data.graph import build_graph
from fastchgnet.keys import ENERGY, FORCES, SITE_ENERGIES, STRESS
from fastchgnet.model.outputs import bond_forces
from fastchgnet.units import EV_A3_TO_GPA

__all__ = ["Terms", "cluster_terms", "lammps_virial", "periodic_terms", "receptive_field"]


@dataclass
class Terms:
    """Energy (eV), forces (n, 3) eV/Å, per-atom energies (n,) eV and the LAMMPS virial (6,) eV
    (xx, yy, zz, xy, xz, yz; W = -V σ, i.e. Σ r ⊗ f, positive = compressive)."""

    energy: float
    forces: np.ndarray
    energies: np.ndarray
    virial: np.ndarray


def receptive_field(model: torch.nn.Module) -> float:
    """R = n_conv × atom-graph cutoff (Å): the site energy of an atom depends on atoms within R."""
    c = model.config
    return float(c.n_conv) * float(c.atom_graph_cutoff)


def lammps_virial(w: np.ndarray) -> np.ndarray:
    """(3, 3) virial -> LAMMPS order xx, yy, zz, xy, xz, yz."""
    w = np.asarray(w, dtype=np.float64)
    return w[[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]]


def periodic_terms(model: torch.nn.Module, z: np.ndarray, pos: np.ndarray, lattice: np.ndarray,
                   pbc: np.ndarray, *, on_isolated_atoms: str = "error",
                   label: str = "LAMMPS system") -> Terms:
    """The whole system (periodic images from the lattice along the periodic axes), as the ASE
    calculator computes it: one host graph and one model call with forces and stress."""
    from ase import Atoms

    atoms = Atoms(numbers=z, positions=pos, cell=lattice, pbc=pbc)
    graph = build_graph(atoms, graph_id=label, on_isolated_atoms=on_isolated_atoms,
                        **model.graph_kwargs())
    param = next(model.parameters())
    batch = collate([graph], dtype=param.dtype).to(param.device)
    out = model(batch, task="efs", create_graph=False, return_site_energies=True)
    arr = {k: out[k].detach().to("cpu", torch.float64).numpy() for k in (ENERGY, FORCES, STRESS)}
    n = len(z)
    e = float(arr[ENERGY][0])
    energy = e * n if model.config.is_intensive else e
    site = out.get(SITE_ENERGIES)
    energies = (site.detach().to("cpu", torch.float64).numpy() if site is not None
                else np.full(n, energy / max(n, 1)))
    vol = abs(float(np.linalg.det(lattice)))
    virial = -vol * arr[STRESS][0] / EV_A3_TO_GPA  # W = -V σ (eV)
    return Terms(energy, arr[FORCES], energies, lammps_virial(virial))


def prune_ghosts(pos: np.ndarray, n_local: int, radius: float) -> np.ndarray:
    """Indices (into ``pos``) of the local atoms and of the ghosts within ``radius`` of a local
    atom; the others cannot change a local site energy."""
    from scipy.spatial import cKDTree

    ghosts = pos[n_local:]
    if ghosts.shape[0] == 0 or n_local == 0:
        return np.arange(n_local)
    d, _ = cKDTree(pos[:n_local]).query(ghosts, k=1, distance_upper_bound=radius)
    return np.concatenate([np.arange(n_local), n_local + np.flatnonzero(np.isfinite(d))])


def cluster_terms(model: torch.nn.Module, z: np.ndarray, pos: np.ndarray, n_local: int, *,
                  on_isolated_atoms: str = "error", label: str = "rank") -> tuple[Terms, np.ndarray]:
    """This rank's share of a system given as local atoms (first ``n_local`` rows) and ghosts.

    Returns (terms, kept): ``terms.energy`` = Σ e_i over local atoms, ``terms.energies`` those
    e_i, ``terms.forces`` (len(kept), 3) the partial forces -∂E_rank/∂x on the local and kept
    ghost atoms, ``terms.virial`` this rank's share of the virial; ``kept`` indexes ``pos``.
    """
    if not getattr(model, "forces_by_autograd", False):
        raise ValueError(f"mode='local' needs forces as energy gradients; this model "
                         f"({type(model).__name__}) predicts them directly: use mode='replicated'")
    if n_local == 0:  # a rank without atoms owes nothing
        return Terms(0.0, np.zeros((0, 3)), np.zeros(0), np.zeros(6)), np.arange(0)
    from ase import Atoms

    kept = prune_ghosts(pos, n_local, receptive_field(model) + 1e-6)
    p = pos[kept]
    lo, hi = p.min(axis=0), p.max(axis=0)
    cell = np.diag(np.maximum(hi - lo, 0.0) + 4.0 * float(model.config.atom_graph_cutoff) + 1.0)
    atoms = Atoms(numbers=z[kept], positions=p, cell=cell, pbc=False)
    graph = build_graph(atoms, graph_id=label, on_isolated_atoms="ignore", **model.graph_kwargs())
    if on_isolated_atoms != "ignore":
        alone = np.ones(n_local, dtype=bool)
        alone[graph.bond_src[graph.bond_src < n_local]] = False
        alone[graph.bond_dst[graph.bond_dst < n_local]] = False
        if alone.any():
            msg = (f"{label}: {int(alone.sum())} isolated atom(s) (no neighbour within "
                   f"{model.config.atom_graph_cutoff} Å), e.g. local atom {int(np.flatnonzero(alone)[0])}")
            if on_isolated_atoms == "error":
                raise ValueError(msg)
            import warnings

            warnings.warn(msg, stacklevel=2)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    batch = collate([graph], dtype=dtype).to(device)
    with torch.enable_grad():
        vec = model.bond_vectors(batch).detach().requires_grad_(True)
        feats = model.features(batch, vec, want_m=False)
        site = feats.site[:n_local]
        e_rank = site.sum()
        (g,) = torch.autograd.grad(e_rank, vec)
    forces = bond_forces(batch, g.detach())
    w = -(vec.detach().unsqueeze(2) * g.detach().unsqueeze(1)).sum(0)  # -Σ r ⊗ ∂E/∂r
    site = site.detach()
    ref = getattr(model, "atom_ref", None)
    if ref is not None:
        site = site + ref.detach().index_select(0, batch.atomic_numbers[:n_local] - 1)
    energies = site.to("cpu", torch.float64).numpy()
    return Terms(float(energies.sum()), forces.to("cpu", torch.float64).numpy(), energies,
                 lammps_virial(w.to("cpu", torch.float64).numpy())), kept
