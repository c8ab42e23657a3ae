"""The Hessian of the energy with respect to the atomic positions, by automatic differentiation.

``H[3i + a, 3j + b] = d^2 E / (dx_ia dx_jb)`` in eV/Å^2, shape ``(3N, 3N)``: the force constants
of the cell at the Gamma point (moving atom j moves all of its periodic images with it). The
graph is built once at the given geometry (a fixed graph: the derivative of the energy for a
displacement that does not cross the cutoff, as finite differences of forces with small steps
give).

How: the positions get ``requires_grad``; the model's bond vectors are ``x_src - x_dst - n L``, so
the model's forces (one gradient of the energy with respect to the bond vectors, kept with
``create_graph=True``) are a differentiable function of the positions, and ``H = -dF/dx``. The
3N rows come from one vectorised backward pass (``torch.autograd.grad(..., is_grads_batched=True)``,
i.e. vmap over the rows), in chunks of ``chunk_size`` rows to bound memory; ``method="loop"`` takes
one backward pass per row instead (the fallback when vmap cannot run an op).

Use float64 (the default for a model loaded here) for finite-difference-grade Hessians.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from fastchgnet.data.device_graph import VerletGraph, graph_inputs
from fastchgnet.keys import FORCES
from fastchgnet.md.calculator import resolve_model
from fastchgnet.units import AMU_A2_FS2_EV

__all__ = ["gamma_frequencies", "hessian", "hessian_of_model"]


def formula(structure: Any) -> str:
    """The formula of a pymatgen Structure or ASE Atoms (names the structure in errors)."""
    if hasattr(structure, "get_chemical_formula"):
        return structure.get_chemical_formula()
    return structure.composition.formula.replace(" ", "")


def _model(model: Any, device: Any, dtype: torch.dtype | None) -> torch.nn.Module:
    """The model on ``device``/``dtype``; a model object passed in is copied, not changed, when it
    must move or change dtype. Names and paths default to float64."""
    if isinstance(model, torch.nn.Module) and callable(getattr(model, "graph_kwargs", None)):
        p = next(model.parameters())
        want_dev = p.device if device is None else torch.device(device)
        want_dt = p.dtype if dtype is None else dtype
        if want_dev != p.device or want_dt != p.dtype:
            model = copy.deepcopy(model).to(device=want_dev, dtype=want_dt)
        return model.eval()
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        dtype = torch.float64 if dtype is None else dtype
        device = "cpu" if device is None else device
    return resolve_model(model, device, dtype)


def hessian_of_model(net: torch.nn.Module, structure: Any, *, method: str = "loop",
                     chunk_size: int | None = None, indices: Sequence[int] | None = None) -> Tensor:
    """The ``(3N, 3N)`` Hessian (eV/Å^2) of ``structure`` with the model ``net`` as it is (its
    device and dtype), or its ``(3k, 3N)`` rows of the atoms ``indices``; a tensor on the model's
    device. See :func:`hessian`."""
    if not getattr(net, "forces_by_autograd", False):
        raise ValueError(f"the model ({type(net).__name__}) does not compute forces as derivatives "
                         "of its energy (direct force heads): its energy Hessian is not defined by "
                         "its forces; use an 'exact' or 'decoupled' model")
    if method not in ("vmap", "loop"):
        raise ValueError(f"method must be 'vmap' or 'loop', got {method!r}")
    p = next(net.parameters())
    gi = graph_inputs([structure], p.device, p.dtype)
    vg = VerletGraph.for_model(net, 0.0)
    vg.names = [formula(structure)]
    batch = vg.update(gi.atomic_numbers, gi.positions, gi.lattice, gi.n_atoms, gi.pbc)
    pos = batch.positions.detach().clone().requires_grad_(True)
    batch = dataclasses.replace(batch, positions=pos)
    with torch.enable_grad():
        forces = net(batch, task="ef", create_graph=True)[FORCES].reshape(-1)
    n3 = forces.shape[0]
    rows = torch.eye(n3, dtype=forces.dtype, device=forces.device)
    if indices is not None:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n3 // 3):
            raise ValueError(f"structure {formula(structure)}: atom indices must be in "
                             f"0..{n3 // 3 - 1}, got {list(indices)}")
        rows = rows[(3 * idx[:, None] + torch.arange(3)).reshape(-1).to(rows.device)]
    n_rows = rows.shape[0]
    step = max(n_rows, 1) if chunk_size is None else max(1, int(chunk_size))
    parts = [rows.new_zeros(0, n3)]
    if method == "vmap":
        for lo in range(0, n_rows, step):  # chunks of Hessian rows (not atoms or bonds)
            (g,) = torch.autograd.grad(forces, pos, rows[lo:lo + step], retain_graph=True,
                                       is_grads_batched=True)
            parts.append(g.reshape(g.shape[0], n3))
    else:
        for k in range(n_rows):  # one backward pass per Hessian row
            (g,) = torch.autograd.grad(forces, pos, rows[k], retain_graph=True)
            parts.append(g.reshape(1, n3))
    return -torch.cat(parts).detach()


def hessian(structure: Any, model: Any = "0.3.0", *, device: str | torch.device | None = None,
            dtype: torch.dtype | None = None, method: str = "loop", chunk_size: int | None = None,
            symmetrize: bool = False, indices: Sequence[int] | None = None) -> np.ndarray:
    """The Hessian ``d^2 E / dx dx`` of one structure, ``(3N, 3N)`` in eV/Å^2 (numpy, float64).

    Rows and columns are ordered atom by atom, x, y, z: index ``3 i + a``. The matrix is
    symmetric to round-off and its rows sum to zero over atoms (translation invariance, the
    acoustic sum rule).

    Args:
        structure: a pymatgen ``Structure`` or an ASE ``Atoms``.
        model: ``"0.3.0"``, a checkpoint path or a fastchgnet model (an exact or decoupled model:
            forces by autograd).
        device: where to compute (default: CPU for a model loaded here, else the model's device).
        dtype: the computation dtype; default float64 for a model loaded here, else the model's
            own dtype (a model passed in is copied, not changed, to another dtype or device).
        method: ``"vmap"`` (batched rows, default) or ``"loop"`` (one backward pass per row).
        chunk_size: rows per vectorised backward pass (default: all 3N at once).
        symmetrize: return ``(H + H^T) / 2`` (the full matrix only).
        indices: only the rows of these atoms: a ``(3k, 3N)`` block (as ASE's ``Vibrations``
            ``indices``; each row costs one backward pass).
    """
    if symmetrize and indices is not None:
        raise ValueError("symmetrize needs the full Hessian (indices=None)")
    net = _model(model, device, dtype)
    h = hessian_of_model(net, structure, method=method, chunk_size=chunk_size, indices=indices)
    h = h.to("cpu", torch.float64).numpy()
    return 0.5 * (h + h.T) if symmetrize else h


def gamma_frequencies(structure: Any, model: Any = "0.3.0", *, hessian_matrix: np.ndarray | None = None,
                      **kwargs: Any) -> np.ndarray:
    """Vibrational frequencies (THz, ascending, ``3N``) of the cell at the Gamma point.

    The eigenvalues λ of the mass-weighted Hessian ``H_ij / sqrt(m_i m_j)`` (ASE's masses, amu)
    give ``f = sqrt(λ) / 2π``; an unstable mode (λ < 0) is returned as a negative frequency
    ``-sqrt(-λ) / 2π``. The three acoustic modes are close to zero. ``kwargs`` go to
    :func:`hessian`; pass ``hessian_matrix`` to reuse one.
    """
    from ase.data import atomic_masses  # ASE only where masses are needed

    h = hessian(structure, model, **kwargs) if hessian_matrix is None else np.asarray(hessian_matrix)
    z = np.asarray(graph_inputs([structure], "cpu").atomic_numbers)
    inv_sqrt_m = np.repeat(1.0 / np.sqrt(atomic_masses[z]), 3)
    dyn = 0.5 * (h + h.T) * inv_sqrt_m[:, None] * inv_sqrt_m[None, :]
    lam = np.linalg.eigvalsh(dyn) / AMU_A2_FS2_EV  # 1/fs^2
    omega = np.sign(lam) * np.sqrt(np.abs(lam))  # rad/fs
    return omega * 1e3 / (2.0 * np.pi)  # THz
