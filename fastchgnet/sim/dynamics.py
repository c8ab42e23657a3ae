"""Batched molecular dynamics: NVE (velocity Verlet) and NVT Langevin (BAOAB) on a batch.

Units: positions Å, time fs, velocities Å/fs, masses amu, energies eV (totals per structure),
forces eV/Å, stress GPa (positive = tensile), temperatures K. Per step there is one host sync for
the graph sizes (see ``device_graph``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from fastchgnet.data.device_graph import GraphInputs
from fastchgnet.nn.scatter import segment_sum
from fastchgnet.sim.potential import BatchPotential, atom_graph_of, atomic_masses
from fastchgnet.units import AMU_A2_FS2_EV, KB_EV

__all__ = ["BatchedMD"]


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
        mom = segment_sum(v * self.masses[:, None], self.ag, self.n_graphs)
        mtot = segment_sum(self.masses, self.ag, self.n_graphs)
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
        return segment_sum(ke, self.ag, self.n_graphs)

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
