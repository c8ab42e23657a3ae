"""Batched FIRE relaxation with in-flight batching.

:func:`relax` runs FIRE (the ASE algorithm and defaults, one set of FIRE variables per structure)
with an optional unit-cell filter (ASE's ``UnitCellFilter`` equations) on many structures in one
batch: converged structures leave the batch and waiting ones enter, so the batch stays full.

Per step there is one host sync for the graph sizes (see ``device_graph``) and one more to decide
which structures leave the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from fastchgnet.data.device_graph import GraphInputs, inverse_cell
from fastchgnet.nn.scatter import segment_sum
from fastchgnet.sim.potential import (BatchPotential, atom_graph_of, concat_systems, select_graphs,
                                      structure_from_arrays)
from fastchgnet.sim.result import RelaxResult
from fastchgnet.units import EV_A3_TO_GPA

__all__ = ["FIREParams", "RelaxResult", "relax"]


@dataclass
class FIREParams:
    """ASE's FIRE parameters and defaults (``ase.optimize.FIRE``; time in ASE's FIRE units)."""

    dt: float = 0.1
    maxstep: float = 0.2
    dtmax: float = 1.0
    n_min: int = 5
    finc: float = 1.1
    fdec: float = 0.5
    astart: float = 0.1
    fa: float = 0.99


@dataclass
class _RelaxState:
    """Per-structure optimiser state; atom rows (N, 3) and cell rows (G, 3, 3)."""

    gi: GraphInputs
    vel: Tensor  # (N, 3)
    vel_cell: Tensor  # (G, 3, 3)
    dt: Tensor  # (G,)
    a: Tensor  # (G,)
    n_pos: Tensor  # (G,) int64, FIRE's Nsteps
    first: Tensor  # (G,) bool: no step taken yet
    steps: Tensor  # (G,) int64, optimiser steps taken
    orig_cell: Tensor  # (G, 3, 3), reference cell of the cell filter
    ids: Tensor  # (G,) int64, index of each structure in the input list (host)

    def select(self, keep: Tensor) -> "_RelaxState":
        gi, atoms = select_graphs(self.gi, keep)
        return _RelaxState(gi, self.vel[atoms], self.vel_cell[keep], self.dt[keep], self.a[keep],
                           self.n_pos[keep], self.first[keep], self.steps[keep],
                           self.orig_cell[keep], self.ids[keep.cpu()])

    @staticmethod
    def concat(parts: Sequence["_RelaxState"]) -> "_RelaxState":
        return _RelaxState(concat_systems([p.gi for p in parts]),
                           *(torch.cat([getattr(p, f) for p in parts]) for f in
                             ("vel", "vel_cell", "dt", "a", "n_pos", "first", "steps",
                              "orig_cell", "ids")))

    @staticmethod
    def new(gi: GraphInputs, ids: Tensor, params: FIREParams) -> "_RelaxState":
        g = gi.lattice.shape[0]
        dt = gi.positions.dtype
        dev = gi.positions.device
        return _RelaxState(gi, torch.zeros_like(gi.positions), torch.zeros_like(gi.lattice),
                           torch.full((g,), params.dt, dtype=dt, device=dev),
                           torch.full((g,), params.astart, dtype=dt, device=dev),
                           torch.zeros(g, dtype=torch.int64, device=dev),
                           torch.ones(g, dtype=torch.bool, device=dev),
                           torch.zeros(g, dtype=torch.int64, device=dev), gi.lattice.clone(), ids)


class _Frame:
    """Generalised coordinates and forces of the (optional) unit-cell filter, as in ASE's
    ``UnitCellFilter``: atom rows ``x F^-T`` and cell rows ``n_atoms F`` with the deformation
    gradient ``F = (L0^-1 L)^T``; forces ``f F`` and ``virial F^-T / n_atoms`` with
    ``virial = -V (sigma + p I)``."""

    def __init__(self, cell_filter: bool, pressure_gpa: float) -> None:
        self.cell_filter = cell_filter
        self.pressure_gpa = pressure_gpa
        self.pressure = pressure_gpa / EV_A3_TO_GPA

    @staticmethod
    def _deform(st: _RelaxState) -> tuple[Tensor, Tensor]:
        """``(F, F^-T) = ((L0^-1 L)^T, L^-1 L0)`` (G, 3, 3); 3x3 inverses written out (a linear
        solver would sync with the host on CUDA)."""
        lat = st.gi.lattice
        return (torch.bmm(inverse_cell(st.orig_cell)[0], lat).transpose(1, 2),
                torch.bmm(inverse_cell(lat)[0], st.orig_cell))

    def forces(self, st: _RelaxState, out: dict[str, Tensor], ag: Tensor) -> tuple[Tensor, Tensor]:
        f = out["forces"]
        if not self.cell_filter:
            return f, torch.zeros_like(st.gi.lattice)
        F, f_inv_t = self._deform(st)
        f_gen = torch.bmm(f.unsqueeze(1), F.index_select(0, ag)).squeeze(1)
        vol = inverse_cell(st.gi.lattice)[2].abs()
        eye = torch.eye(3, dtype=f.dtype, device=f.device)
        virial = -vol[:, None, None] * (out["stress"] / EV_A3_TO_GPA + self.pressure * eye)
        cf = st.gi.n_atoms.to(f.dtype)[:, None, None]
        return f_gen, torch.bmm(virial, f_inv_t) / cf

    def move(self, st: _RelaxState, dr: Tensor, dr_cell: Tensor, ag: Tensor) -> None:
        gi = st.gi
        if not self.cell_filter:
            gi.positions = gi.positions + dr
            return
        F, f_inv_t = self._deform(st)
        cf = gi.n_atoms.to(F.dtype)[:, None, None]
        gen_pos = torch.bmm(gi.positions.unsqueeze(1), f_inv_t.index_select(0, ag)).squeeze(1) + dr
        F_new = (cf * F + dr_cell) / cf
        gi.lattice = torch.bmm(st.orig_cell, F_new.transpose(1, 2))
        gi.positions = torch.bmm(gen_pos.unsqueeze(1),
                                 F_new.transpose(1, 2).index_select(0, ag)).squeeze(1)


def _fire_step(st: _RelaxState, f: Tensor, fc: Tensor, active: Tensor, p: FIREParams,
               frame: _Frame) -> None:
    """One FIRE step of every structure with ``active`` True (ASE's FIRE, per structure)."""
    gi = st.gi
    g = gi.lattice.shape[0]
    ag = atom_graph_of(gi.n_atoms, gi.positions.shape[0])

    def dot(x: Tensor, xc: Tensor, y: Tensor, yc: Tensor) -> Tensor:  # per-structure <x, y>
        return segment_sum((x * y).sum(1), ag, g) + (xc * yc).sum((1, 2))

    vf = dot(f, fc, st.vel, st.vel_cell)
    f2 = dot(f, fc, f, fc)
    v2 = dot(st.vel, st.vel_cell, st.vel, st.vel_cell)
    uphill_ok = (vf > 0) & ~st.first
    reset = ~(vf > 0) & ~st.first
    mix = st.a * torch.sqrt(v2) / torch.sqrt(f2).clamp(min=torch.finfo(f.dtype).tiny)
    keep = torch.where(uphill_ok, 1.0 - st.a, torch.where(reset, 0.0, 1.0)).to(f.dtype)
    mix = torch.where(uphill_ok, mix, torch.zeros_like(mix))
    vel = keep.index_select(0, ag)[:, None] * st.vel + mix.index_select(0, ag)[:, None] * f
    vel_c = keep[:, None, None] * st.vel_cell + mix[:, None, None] * fc
    grow = uphill_ok & (st.n_pos > p.n_min)
    dt = torch.where(grow, torch.clamp(st.dt * p.finc, max=p.dtmax), st.dt)
    dt = torch.where(reset, st.dt * p.fdec, dt)
    a = torch.where(grow, st.a * p.fa, torch.where(reset, torch.full_like(st.a, p.astart), st.a))
    n_pos = torch.where(uphill_ok, st.n_pos + 1, torch.where(reset, 0, st.n_pos))
    vel = vel + dt.index_select(0, ag)[:, None] * f
    vel_c = vel_c + dt[:, None, None] * fc
    dr = dt.index_select(0, ag)[:, None] * vel
    dr_c = dt[:, None, None] * vel_c
    norm = torch.sqrt(dot(dr, dr_c, dr, dr_c))
    scale = torch.where(norm > p.maxstep, p.maxstep / norm.clamp(min=1e-300), torch.ones_like(norm))
    scale = torch.where(active, scale, torch.zeros_like(scale))
    frame.move(st, dr * scale.index_select(0, ag)[:, None], dr_c * scale[:, None, None], ag)
    upd = active
    st.vel = torch.where(upd.index_select(0, ag)[:, None], vel, st.vel)
    st.vel_cell = torch.where(upd[:, None, None], vel_c, st.vel_cell)
    st.dt, st.a = torch.where(upd, dt, st.dt), torch.where(upd, a, st.a)
    st.n_pos = torch.where(upd, n_pos, st.n_pos)
    st.first = st.first & ~upd
    st.steps = st.steps + upd.long()


def relax(
    model_or_potential: Any,
    structures: Sequence[Any],
    *,
    fmax: float = 0.1,
    steps: int = 500,
    cell_filter: bool = False,
    pressure: float = 0.0,
    max_structures: int = 64,
    max_atoms: int = 20_000,
    params: FIREParams | None = None,
    skin: float = 1.0,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> list[RelaxResult]:
    """Relax many structures with FIRE in one batch, with in-flight batching.

    The batch holds at most ``max_structures`` structures and ``max_atoms`` atoms (a larger single
    structure runs alone). After each step, structures whose largest force (including the cell
    rows of the filter) is below ``fmax``, or that took ``steps`` steps, leave the batch, and
    waiting structures enter, in input order. Each structure follows exactly the trajectory that
    ASE's ``FIRE`` (with ``UnitCellFilter`` if ``cell_filter``) would give it alone.

    Args:
        model_or_potential: a fastchgnet model or a :class:`BatchPotential`.
        structures: pymatgen Structures or ASE Atoms (not modified).
        fmax: force criterion (eV/Å); with the cell filter also on ``virial / n_atoms`` (eV).
        steps: largest number of FIRE steps per structure.
        cell_filter: relax the cell as well (ASE ``UnitCellFilter`` coordinates).
        pressure: external pressure (GPa) for the cell filter.
        callback: called after each step with ``{"step", "ids", "energy", "fmax"}`` (tensors).

    Returns:
        One :class:`RelaxResult` per input structure, in input order.
    """
    pot = (model_or_potential if isinstance(model_or_potential, BatchPotential)
           else BatchPotential(model_or_potential, skin=skin))
    params = params or FIREParams()
    frame = _Frame(cell_filter, pressure)
    n_in = len(structures)
    sizes = [len(s) for s in structures]
    results: list[RelaxResult | None] = [None] * n_in
    waiting = list(range(n_in))
    state: _RelaxState | None = None
    it = 0

    def admit(cur_atoms: int, cur_n: int) -> list[int]:
        take: list[int] = []
        while waiting and cur_n + len(take) < max_structures and (
                cur_atoms + sizes[waiting[0]] <= max_atoms or (cur_n == 0 and not take)):
            cur_atoms += sizes[waiting[0]]
            take.append(waiting.pop(0))
        return take

    while waiting or state is not None:
        if state is None or (waiting and int(state.gi.n_atoms.shape[0]) < max_structures):
            cur_atoms = 0 if state is None else int(state.gi.positions.shape[0])
            cur_n = 0 if state is None else int(state.gi.n_atoms.shape[0])
            take = admit(cur_atoms, cur_n)
            if take:
                new = _RelaxState.new(pot.system([structures[i] for i in take]),
                                      torch.tensor(take), params)
                state = new if state is None else _RelaxState.concat([state, new])
                pot.verlet.reset()
                pot.verlet.names = state.ids.tolist()
        assert state is not None
        gi = state.gi
        ag = atom_graph_of(gi.n_atoms, gi.positions.shape[0])
        out = pot(gi, stress=True)
        f, fc = frame.forces(state, out, ag)
        g = gi.n_atoms.shape[0]
        fmax_g = gi.positions.new_zeros(g).scatter_reduce(0, ag, torch.linalg.vector_norm(f, dim=1),
                                                          "amax", include_self=True)
        if cell_filter:
            fmax_g = torch.maximum(fmax_g, torch.linalg.vector_norm(fc, dim=2).amax(1))
        conv = fmax_g < fmax
        done = conv | (state.steps >= steps)
        if callback is not None:
            callback({"step": it, "ids": state.ids, "energy": out["energy"], "fmax": fmax_g})
        done_h = done.cpu()  # the relaxation's own sync: who leaves the batch
        if bool(done_h.any()):
            _collect(results, structures, state, out, conv, done_h, frame)
            remaining = ~done_h
            if not bool(remaining.any()):
                state = None
                pot.verlet.reset()
                continue
            state = state.select(remaining.to(gi.positions.device))
            pot.verlet.reset()
            pot.verlet.names = state.ids.tolist()
            continue  # the remaining structures are evaluated again with the new members
        _fire_step(state, f, fc, ~done, params, frame)
        it += 1
    return results  # type: ignore[return-value]


def _collect(results: list[RelaxResult | None], structures: Sequence[Any], st: _RelaxState,
             out: dict[str, Tensor], conv: Tensor, done: Tensor, frame: _Frame) -> None:
    """Store the results of the structures that leave the batch (host copies)."""
    gi = st.gi
    n = gi.n_atoms.cpu().numpy()
    off = np.concatenate([[0], np.cumsum(n)])
    pos = gi.positions.detach().cpu().double().numpy()
    lat = gi.lattice.detach().cpu().double().numpy()
    f = out["forces"].cpu().double().numpy()
    s = out["stress"].cpu().double().numpy()
    e = out["energy"].cpu().double().numpy()
    steps = st.steps.cpu().numpy()
    conv_h = conv.cpu().numpy()
    for k in np.flatnonzero(done.numpy()):
        i = int(st.ids[k])
        sl = slice(off[k], off[k + 1])
        # the real residuals, as the ASE relaxer reports them (convergence itself was judged on
        # the filter's generalised forces)
        smax = (float(np.abs(s[k] + frame.pressure_gpa * np.eye(3)).max()) if frame.cell_filter
                else 0.0)
        results[i] = RelaxResult(structure_from_arrays(structures[i], pos[sl], lat[k]),
                                 energy=float(e[k]), converged=bool(conv_h[k]), steps=int(steps[k]),
                                 forces=f[sl], stress=s[k],
                                 fmax=float(np.linalg.norm(f[sl], axis=1).max(initial=0.0)),
                                 smax=smax)
