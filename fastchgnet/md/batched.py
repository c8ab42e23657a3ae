"""Batched simulation: many structures relaxed or simulated at once, in one batch on the device.

* :class:`BatchPotential` — energies, forces and stresses of a :class:`~fastchgnet.data.
  device_graph.GraphInputs` system; graphs on the device with a Verlet skin.
* :func:`relax` — FIRE (the ASE algorithm and defaults, one set of FIRE variables per structure)
  with an optional unit-cell filter (ASE's ``UnitCellFilter`` equations), with **in-flight
  batching**: converged structures leave the batch and waiting ones enter, so the batch stays full.
* :class:`BatchedMD` — NVE (velocity Verlet) and NVT Langevin (BAOAB) on a batch.

Units: positions Å, time fs, velocities Å/fs, masses amu, energies eV, forces eV/Å, stress GPa
(positive = tensile), temperatures K. The model's energy per atom is multiplied by the number of
atoms: energies here are totals per structure.

Per step there is one host sync for the graph sizes (see ``device_graph``); relaxations sync once
more per step to decide which structures leave the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from fastchgnet.data.device_graph import GraphInputs, VerletGraph, graph_inputs, inverse_cell
from fastchgnet.model.exact import EV_A3_TO_GPA

KB_EV = 8.617333262e-5  # Boltzmann constant, eV/K
# 1 amu Å^2/fs^2 in eV: converts m v^2 (amu, Å/fs) to eV and F/m (eV/Å/amu) to Å/fs^2
AMU_A2_FS2_EV = 103.64269572045424  # amu · 1e10 / e (CODATA 2018, as ASE)


def _scatter_sum(values: Tensor, index: Tensor, n: int) -> Tensor:
    return values.new_zeros(n).index_add(0, index, values)


def atom_graph_of(n_atoms: Tensor, n_total: int) -> Tensor:
    """(n_atoms_total,) structure index of each atom."""
    return torch.repeat_interleave(torch.arange(n_atoms.shape[0], device=n_atoms.device), n_atoms,
                                   output_size=n_total)


# ------------------------------------------------------------------------------------------------
# systems: selection and concatenation (used when structures enter or leave the batch)


def select_graphs(gi: GraphInputs, keep: Tensor) -> tuple[GraphInputs, Tensor]:
    """The structures with ``keep`` True (a (n_graphs,) bool), and the atom mask."""
    ag = atom_graph_of(gi.n_atoms, gi.positions.shape[0])
    atoms = keep.index_select(0, ag)
    return GraphInputs(gi.atomic_numbers[atoms], gi.positions[atoms], gi.lattice[keep],
                       gi.n_atoms[keep], gi.pbc[keep]), atoms


def concat_systems(parts: Sequence[GraphInputs]) -> GraphInputs:
    return GraphInputs(*(torch.cat([getattr(p, f) for p in parts]) for f in
                         ("atomic_numbers", "positions", "lattice", "n_atoms", "pbc")))


def structure_from_arrays(template: Any, positions: np.ndarray, lattice: np.ndarray) -> Any:
    """A copy of ``template`` (pymatgen Structure or ASE Atoms) with new positions and cell."""
    if hasattr(template, "get_positions"):
        atoms = template.copy()
        atoms.set_cell(lattice, scale_atoms=False)
        atoms.set_positions(positions)
        return atoms
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice(lattice, pbc=template.lattice.pbc), template.species, positions,
                     coords_are_cartesian=True, site_properties=template.site_properties or None)


# ------------------------------------------------------------------------------------------------
# potential


class BatchPotential:
    """Energies (eV, per structure), forces (eV/Å) and stresses (GPa) of a batch of structures.

    Args:
        model: a fastchgnet model (exact, decoupled or heads), in eval mode.
        skin: Verlet skin (Å) of the device neighbour list.
        forward: optional replacement of ``model(batch, task=...)``, e.g. a compiled forward from
            :mod:`fastchgnet.md.compiled`; called as ``forward(batch, task)``.
    """

    def __init__(self, model: torch.nn.Module, *, skin: float = 1.0,
                 forward: Callable[..., dict[str, Tensor]] | None = None, **graph_kwargs: Any):
        self.model = model.eval()
        self.verlet = VerletGraph.for_model(model, skin, **graph_kwargs)
        self.forward = forward
        self.n_calls = 0

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(self, gi: GraphInputs, stress: bool = True) -> dict[str, Tensor]:
        batch = self.verlet.update(gi.atomic_numbers, gi.positions, gi.lattice, gi.n_atoms, gi.pbc)
        task = "efs" if stress else "ef"
        if self.forward is not None:
            out = self.forward(batch, task)
        else:
            out = self.model(batch, task=task, create_graph=False)
        self.n_calls += 1
        n = gi.n_atoms.to(out["e"].dtype)
        e = out["e"] * n if self.model.config.is_intensive else out["e"]  # type: ignore[union-attr]
        res = {"energy": e.detach(), "forces": out["f"].detach()}
        if stress:
            res["stress"] = out["s"].detach()
        return res

    def system(self, structures: Sequence[Any]) -> GraphInputs:
        """Structures as a system on the model's device and dtype."""
        return graph_inputs(structures, self.device, self.dtype)


# ------------------------------------------------------------------------------------------------
# FIRE with an optional unit-cell filter


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


@dataclass
class RelaxResult:
    """One relaxed structure: final geometry and the potential's outputs there."""

    structure: Any  # same type as the input (pymatgen Structure or ASE Atoms)
    energy: float  # eV (total)
    forces: np.ndarray  # (n, 3) eV/Å
    stress: np.ndarray  # (3, 3) GPa
    n_steps: int
    converged: bool
    info: dict = field(default_factory=dict)


class _Frame:
    """Generalised coordinates and forces of the (optional) unit-cell filter, as in ASE's
    ``UnitCellFilter``: atom rows ``x F^-T`` and cell rows ``n_atoms F`` with the deformation
    gradient ``F = (L0^-1 L)^T``; forces ``f F`` and ``virial F^-T / n_atoms`` with
    ``virial = -V (sigma + p I)``."""

    def __init__(self, cell_filter: bool, pressure_gpa: float) -> None:
        self.cell_filter = cell_filter
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
        return _scatter_sum((x * y).sum(1), ag, g) + (xc * yc).sum((1, 2))

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
            _collect(results, structures, state, out, conv, done_h)
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
             out: dict[str, Tensor], conv: Tensor, done: Tensor) -> None:
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
        results[i] = RelaxResult(structure_from_arrays(structures[i], pos[sl], lat[k]),
                                 float(e[k]), f[sl], s[k], int(steps[k]), bool(conv_h[k]))


# ------------------------------------------------------------------------------------------------
# molecular dynamics


def atomic_masses(numbers: Tensor) -> Tensor:
    """Masses (amu) of atomic numbers, from ASE's table."""
    from ase.data import atomic_masses as table

    return torch.as_tensor(table, dtype=torch.float64, device=numbers.device).index_select(0, numbers)


class BatchedMD:
    """NVE or NVT-Langevin molecular dynamics of a batch of structures.

    NVE is velocity Verlet. NVT Langevin uses the BAOAB splitting (half kick, half drift, exact
    Ornstein-Uhlenbeck velocity update, half drift, force, half kick), with one friction and one
    target temperature per structure.

    Args:
        model_or_potential: a fastchgnet model or a :class:`BatchPotential`.
        structures: pymatgen Structures / ASE Atoms, or a :class:`GraphInputs`.
        timestep: fs.
        ensemble: ``"nve"`` or ``"nvt_langevin"``.
        temperature: target temperature (K), a float or one per structure (Langevin).
        friction: Langevin friction (1/fs).
        velocities: initial velocities (N, 3) Å/fs; else Maxwell-Boltzmann at ``init_temperature``
            (default ``temperature``, or 0) with the centre-of-mass motion removed per structure.
        seed: seed of the random numbers (initial velocities, Langevin noise).
        compute_stress: also compute the stress (GPa) at each step.
    """

    def __init__(self, model_or_potential: Any, structures: Any, *, timestep: float = 1.0,
                 ensemble: str = "nve", temperature: float | Sequence[float] | None = None,
                 friction: float = 0.01, velocities: Tensor | None = None,
                 init_temperature: float | Sequence[float] | None = None, seed: int = 0,
                 compute_stress: bool = False, skin: float = 1.0) -> None:
        if ensemble not in ("nve", "nvt_langevin"):
            raise ValueError(f"ensemble must be 'nve' or 'nvt_langevin', got {ensemble!r}")
        if ensemble == "nvt_langevin" and temperature is None:
            raise ValueError("nvt_langevin needs a temperature (K)")
        self.pot = (model_or_potential if isinstance(model_or_potential, BatchPotential)
                    else BatchPotential(model_or_potential, skin=skin))
        self.gi = structures if isinstance(structures, GraphInputs) else self.pot.system(structures)
        gi = self.gi
        self.dtype, self.device = gi.positions.dtype, gi.positions.device
        self.n_graphs = int(gi.n_atoms.shape[0])
        self.ag = atom_graph_of(gi.n_atoms, gi.positions.shape[0])
        self.masses = atomic_masses(gi.atomic_numbers).to(self.dtype)
        self.dt = float(timestep)
        self.ensemble = ensemble
        self.friction = float(friction)
        self.compute_stress = compute_stress
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.temperature = self._per_graph(temperature if temperature is not None else 0.0)
        if velocities is not None:
            self.velocities = velocities.to(device=self.device, dtype=self.dtype).clone()
        else:
            t0 = init_temperature if init_temperature is not None else (temperature or 0.0)
            self.velocities = self.maxwell_boltzmann(self._per_graph(t0))
        self.steps = 0
        self._out = self.pot(gi, stress=compute_stress)

    def _per_graph(self, v: float | Sequence[float]) -> Tensor:
        t = torch.as_tensor(v, dtype=self.dtype, device=self.device)
        return t.expand(self.n_graphs).clone() if t.ndim == 0 else t

    def _sigma_v(self, temperature: Tensor) -> Tensor:
        """(N,) standard deviation of one velocity component at ``temperature`` (Å/fs)."""
        kt = KB_EV * temperature.index_select(0, self.ag)
        return torch.sqrt(kt / (self.masses * AMU_A2_FS2_EV))

    def maxwell_boltzmann(self, temperature: Tensor) -> Tensor:
        """Random velocities at ``temperature`` (per structure) without centre-of-mass motion."""
        noise = torch.randn(self.gi.positions.shape, generator=self.generator, device=self.device,
                            dtype=self.dtype)
        v = noise * self._sigma_v(temperature)[:, None]
        return self._remove_com(v)

    def _remove_com(self, v: Tensor) -> Tensor:
        mom = torch.zeros(self.n_graphs, 3, dtype=self.dtype, device=self.device).index_add(
            0, self.ag, v * self.masses[:, None])
        mtot = _scatter_sum(self.masses, self.ag, self.n_graphs)
        return v - (mom / mtot[:, None]).index_select(0, self.ag)

    # ------------------------------------------------------------------------------------------
    @property
    def potential_energy(self) -> Tensor:
        """(n_graphs,) eV."""
        return self._out["energy"]

    @property
    def forces(self) -> Tensor:
        return self._out["forces"]

    @property
    def stress(self) -> Tensor | None:
        return self._out.get("stress")

    @property
    def kinetic_energy(self) -> Tensor:
        """(n_graphs,) eV."""
        ke = 0.5 * AMU_A2_FS2_EV * self.masses * (self.velocities ** 2).sum(1)
        return _scatter_sum(ke, self.ag, self.n_graphs)

    @property
    def temperature_now(self) -> Tensor:
        """(n_graphs,) instantaneous temperature (K), 3N degrees of freedom as in ASE."""
        dof = 3.0 * self.gi.n_atoms.to(self.dtype)
        return 2.0 * self.kinetic_energy / (dof * KB_EV)

    def _kick(self, h: float) -> None:
        acc = self.forces / (self.masses[:, None] * AMU_A2_FS2_EV)
        self.velocities = self.velocities + h * acc

    def _drift(self, h: float) -> None:
        self.gi.positions = self.gi.positions + h * self.velocities

    def _ou(self, h: float) -> None:
        c1 = math.exp(-self.friction * h)
        c2 = math.sqrt(max(0.0, 1.0 - c1 * c1))
        noise = torch.randn(self.velocities.shape, generator=self.generator, device=self.device,
                            dtype=self.dtype)
        self.velocities = c1 * self.velocities + c2 * self._sigma_v(self.temperature)[:, None] * noise

    def step(self) -> None:
        """One time step of every structure."""
        dt = self.dt
        self._kick(0.5 * dt)
        if self.ensemble == "nve":
            self._drift(dt)
        else:
            self._drift(0.5 * dt)
            self._ou(dt)
            self._drift(0.5 * dt)
        self._out = self.pot(self.gi, stress=self.compute_stress)
        self._kick(0.5 * dt)
        self.steps += 1

    def run(self, n_steps: int, log_every: int = 1) -> dict[str, np.ndarray]:
        """Run ``n_steps`` steps; returns per-structure logs (n_logged, n_graphs) of
        ``potential_energy``, ``kinetic_energy``, ``total_energy`` (eV) and ``temperature`` (K),
        copied to the host every ``log_every`` steps."""
        logs: dict[str, list[Tensor]] = {"potential_energy": [], "kinetic_energy": [],
                                          "temperature": []}
        for k in range(n_steps):
            self.step()
            if (k + 1) % log_every == 0:
                logs["potential_energy"].append(self.potential_energy)
                logs["kinetic_energy"].append(self.kinetic_energy)
                logs["temperature"].append(self.temperature_now)
        res = {k: (torch.stack(v).cpu().double().numpy() if v else np.zeros((0, self.n_graphs)))
               for k, v in logs.items()}
        res["total_energy"] = res["potential_energy"] + res["kinetic_energy"]
        return res
