"""Molecular dynamics with a fastchgnet model (ASE integrators).

:class:`MolecularDynamics` sets up NVE (velocity Verlet), NVT (Langevin, Nosé–Hoover chain,
Bussi, Berendsen) and NPT (MTK Nosé–Hoover with a full-cell barostat, its isotropic variant, or
inhomogeneous Berendsen) runs of ASE's integrators with a :class:`~fastchgnet.md.CHGNetCalculator`.

Files are written at every log interval and flushed at once: the trajectory (ASE ``.traj``, or
extended XYZ for ``.xyz``/``.extxyz``) and a text log, so a crash (even SIGKILL) loses at most one
log interval. Every step checks the cell: a cell whose volume leaves ``[V0 / max_volume_ratio,
V0 * max_volume_ratio]`` or that flattens raises ``ValueError`` naming the step, and atoms closer
than 0.5 Å raise the graph builder's ``ValueError`` (with the step added).

Defaults are fastchgnet's own and differ from chgnet's ``MolecularDynamics``: NVT with a Langevin
thermostat and a 1 fs step here, NVT Berendsen and 2 fs there (and ``on_isolated_atoms="error"``
here, ``"warn"`` there). :mod:`fastchgnet.compat.chgnet` has chgnet's class with chgnet's
defaults.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from ase import units

from fastchgnet.md.calculator import as_atoms, make_calculator
from fastchgnet.md.options import check_keywords
from fastchgnet.md.progress import Progress, progress_from_verbose

__all__ = ["ENSEMBLES", "FrameRecorder", "MolecularDynamics", "TrajectoryWriter", "TextLog", "refuse_existing",
           "estimate_bulk_modulus", "nve_energy_drift", "total_energy"]

# ensemble -> accepted thermostats (first = default)
ENSEMBLES: dict[str, tuple[str, ...]] = {
    "nve": ("none",),
    "nvt": ("langevin", "nose-hoover", "bussi", "berendsen"),
    "npt": ("mtk", "mtk-isotropic", "berendsen"),
}
_ALIASES = {"nose_hoover": "nose-hoover", "nosehoover": "nose-hoover", "nh": "nose-hoover",
            "csvr": "bussi", "berendsen_inhomogeneous": "berendsen"}

# Fallback bulk modulus (GPa) for the Berendsen barostat when the estimate fails: only the
# pressure relaxation time depends on it.
FALLBACK_BULK_MODULUS = 100.0


# ----------------------------------------------------------------------------------------------
# files


def refuse_existing(path: Path, append: bool, overwrite: bool) -> None:
    """A FileExistsError for a non-empty ``path`` that would be replaced: an earlier result is
    never overwritten unless asked for (``append=True`` adds to it, ``overwrite=True`` replaces it)."""
    if not (append or overwrite) and path.is_file() and path.stat().st_size > 0:
        raise FileExistsError(f"{path} exists: pass overwrite=True to replace it (--overwrite on the "
                              "command line), append=True to add to it, or another file name")


class TrajectoryWriter:
    """Appends frames of ``atoms`` (with the calculator's results) to a file, flushed per frame.

    ``.traj`` files use ASE's trajectory format (each frame is complete on disk once written);
    ``.xyz`` and ``.extxyz`` files use extended XYZ.
    """

    def __init__(self, path: str | Path, atoms: Any, append: bool = False,
                 overwrite: bool = False) -> None:
        self.path = Path(path)
        refuse_existing(self.path, append, overwrite)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.atoms = atoms
        self.n_frames = 0
        self._traj = None
        self._fh = None
        if self.path.suffix == ".traj":
            from ase.io import Trajectory

            self._traj = Trajectory(str(self.path), "a" if append else "w", atoms)
        else:
            self._fh = open(self.path, "a" if append else "w")

    def write(self) -> None:
        if self._traj is not None:
            self._traj.write(self.atoms)
        else:
            from ase.io import write

            write(self._fh, self.atoms, format="extxyz")
            self._fh.flush()
        self.n_frames += 1

    def close(self) -> None:
        if self._traj is not None:
            self._traj.close()
        if self._fh is not None:
            self._fh.close()


class TextLog:
    """A whitespace-separated text log with a ``#`` header; every row is flushed."""

    def __init__(self, path: str | Path, columns: list[str], append: bool = False,
                 overwrite: bool = False) -> None:
        self.path = Path(path)
        refuse_existing(self.path, append, overwrite)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not (append and self.path.is_file() and self.path.stat().st_size > 0)
        self._fh = open(self.path, "a" if append else "w")
        if fresh:
            self._fh.write("# " + " ".join(columns) + "\n")
            self._fh.flush()

    def row(self, values: list[Any]) -> None:
        cells = [f"{v:d}" if isinstance(v, (int, np.integer)) else f"{v:.6f}" for v in values]
        self._fh.write(" ".join(cells) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class FrameRecorder:
    """In-memory record of frames (like chgnet's ``TrajectoryObserver``): energies (eV), forces
    (eV/Å), stresses (Voigt eV/Å³), magnetic moments (μB), positions, cells and step numbers."""

    def __init__(self, atoms: Any) -> None:
        self.atoms = atoms
        self.steps: list[int] = []
        self.energies: list[float] = []
        self.forces: list[np.ndarray] = []
        self.stresses: list[np.ndarray] = []
        self.magmoms: list[np.ndarray] = []
        self.positions: list[np.ndarray] = []
        self.cells: list[np.ndarray] = []

    def record(self, step: int) -> None:
        res = self.atoms.calc.results
        self.steps.append(int(step))
        self.energies.append(float(self.atoms.get_potential_energy()))
        self.forces.append(np.array(self.atoms.get_forces()))
        self.stresses.append(np.array(res["stress"]) if "stress" in res else np.full(6, np.nan))
        self.magmoms.append(np.array(res["magmoms"]) if "magmoms" in res else
                            np.full(len(self.atoms), np.nan))
        self.positions.append(self.atoms.get_positions())
        self.cells.append(np.array(self.atoms.get_cell()[:]))

    @property
    def atom_positions(self) -> list[np.ndarray]:
        """chgnet's name for :attr:`positions`."""
        return self.positions

    def __len__(self) -> int:
        return len(self.steps)


def _pressure_gpa(stress: Any) -> float:
    """Pressure (GPa, positive = compressed) of an ASE Voigt stress (eV/Å^3); NaN if None."""
    return float("nan") if stress is None else float(-np.mean(stress[:3]) / units.GPa)


def total_energy(atoms: Any) -> float:
    """Potential plus kinetic energy (eV)."""
    return float(atoms.get_potential_energy() + atoms.get_kinetic_energy())


# ----------------------------------------------------------------------------------------------
# checks


def check_cell(atoms: Any, v0: float, max_volume_ratio: float, step: int) -> None:
    """ValueError when the cell volume left ``[v0 / r, v0 * r]`` or the cell flattened."""
    cell = np.asarray(atoms.get_cell()[:], dtype=np.float64)
    vol = abs(float(np.linalg.det(cell)))
    lengths = float(np.prod(np.linalg.norm(cell, axis=1)))
    who = atoms.get_chemical_formula()
    if not math.isfinite(vol) or not np.isfinite(atoms.get_positions()).all():
        raise ValueError(f"{who}: non-finite cell or positions at MD step {step} (the run diverged)")
    if not (v0 / max_volume_ratio <= vol <= v0 * max_volume_ratio):
        raise ValueError(
            f"{who}: the cell {'collapsed' if vol < v0 else 'blew up'} at MD step {step}: volume "
            f"{vol:.2f} Å^3 vs {v0:.2f} Å^3 at the start (allowed ratio {max_volume_ratio:g}); "
            f"check the pressure, the barostat time constant (taup) and the bulk modulus")
    if lengths > 0 and vol / lengths < 0.05:
        raise ValueError(f"{who}: the cell flattened at MD step {step} (volume / (a b c) = "
                         f"{vol / lengths:.3f}); check the barostat settings")


# ----------------------------------------------------------------------------------------------
# bulk modulus


def estimate_bulk_modulus(atoms: Any, calc: Any = None, strain: float = 0.01) -> float:
    """Bulk modulus (GPa) from the pressure at ±``strain`` isotropic strain (ions scaled with the
    cell, not relaxed): ``B = -V dP/dV``. Used for the Berendsen barostat's coupling."""
    probe = atoms.copy()
    probe.calc = calc if calc is not None else atoms.calc
    cell0 = np.array(atoms.get_cell()[:])
    p, v = [], []
    for eps in (-strain, strain):
        probe.set_cell(cell0 * (1 + eps), scale_atoms=True)
        p.append(_pressure_gpa(probe.get_stress()))
        v.append(probe.get_volume())
    vol = atoms.get_volume()
    return float(-(p[1] - p[0]) / ((v[1] - v[0]) / vol))


# ----------------------------------------------------------------------------------------------
# dynamics


class MolecularDynamics:
    """MD of one structure with a fastchgnet model.

    Args:
        atoms: an ASE ``Atoms`` (run in place) or a pymatgen ``Structure`` (converted).
        model: ``"0.3.0"``, a checkpoint path, a fastchgnet model, a ``chgnet.model.CHGNet``
            object (converted once), or an ASE calculator.
        ensemble: ``"nve"``, ``"nvt"`` or ``"npt"``.
        thermostat: NVT ``"langevin"`` (default), ``"nose-hoover"`` (Nosé–Hoover chain),
            ``"bussi"``, ``"berendsen"``; NPT ``"mtk"`` (default: Nosé–Hoover chain with the MTK
            full-cell barostat), ``"mtk-isotropic"``, ``"berendsen"`` (inhomogeneous: cell lengths
            independent, angles fixed).
        temperature: target temperature (K).
        starting_temperature: draw Maxwell–Boltzmann velocities at this temperature (K) and remove
            the centre-of-mass motion; None keeps the atoms' momenta (zero for a Structure).
        timestep: fs.
        pressure: external pressure (GPa) for NPT.
        taut: thermostat time constant (fs), default 100 × timestep; Langevin friction = 1/taut.
        taup: barostat time constant (fs), default 1000 × timestep.
        bulk_modulus: GPa, for the Berendsen barostat; None estimates it with the model.
        trajectory: ``.traj`` (ASE) or ``.xyz``/``.extxyz`` file written every ``loginterval``
            steps (frame 0 included).
        logfile: text log (step, time, energies, temperature, pressure, volume) every
            ``loginterval`` steps.
        loginterval: steps between log lines and frames.
        append: append to existing trajectory and log files.
        overwrite: replace existing trajectory and log files; without ``append`` or ``overwrite``
            an existing non-empty file is a ``FileExistsError`` (an earlier run is never lost).
        seed: seed of the initial velocities and of stochastic thermostats.
        max_volume_ratio: allowed volume change factor before the run stops (see
            :func:`check_cell`).
        device, dtype, on_isolated_atoms: for a calculator made here (see
            :class:`~fastchgnet.md.CHGNetCalculator`).
        compile: for a calculator made here: ``"auto"`` (default: eager until the model calls
            have taken about one compilation's time, then compiled with Inductor), ``True``
            (compile at the first step) or ``False`` (always eager).
        verbose: progress lines on stderr during :meth:`run` (step, temperature, energy):
            ``True`` at most every 2 s (and the last step), a number: that interval in seconds.

    Any other keyword is a ``TypeError``; chgnet's names (``use_device``, ``append_trajectory``,
    ``crystal_feas_logfile``...) get a message naming the fastchgnet equivalent.
    """

    def __init__(
        self,
        atoms: Any,
        *,
        model: Any = "0.3.0",
        ensemble: str = "nvt",
        thermostat: str | None = None,
        temperature: float = 300.0,
        starting_temperature: float | None = None,
        timestep: float = 1.0,
        pressure: float = 1.01325e-4,
        taut: float | None = None,
        taup: float | None = None,
        bulk_modulus: float | None = None,
        trajectory: str | Path | None = None,
        logfile: str | Path | None = None,
        loginterval: int = 1,
        append: bool = False,
        overwrite: bool = False,
        seed: int | None = None,
        max_volume_ratio: float = 2.0,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        on_isolated_atoms: str = "error",
        compile: bool | str = "auto",
        verbose: bool | float = False,
        **kwargs: Any,
    ) -> None:
        check_keywords("MolecularDynamics", kwargs)
        # both files are checked before any work: a refusal leaves nothing half-written
        for path in (trajectory, logfile):
            if path is not None:
                refuse_existing(Path(path), append, overwrite)
        progress_from_verbose(verbose, "", None)  # checks the value now
        self.verbose = verbose
        ensemble = ensemble.lower()
        if ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble must be one of {sorted(ENSEMBLES)}, got {ensemble!r}")
        choices = ENSEMBLES[ensemble]
        thermostat = (thermostat or choices[0]).lower()
        thermostat = _ALIASES.get(thermostat, thermostat)
        if ensemble == "npt" and thermostat == "nose-hoover":
            thermostat = "mtk"
        if thermostat not in choices:
            raise ValueError(f"thermostat {thermostat!r} is not available for {ensemble}: "
                             f"choose one of {choices}")
        if timestep <= 0 or loginterval < 1 or max_volume_ratio <= 1:
            raise ValueError("timestep must be > 0, loginterval >= 1 and max_volume_ratio > 1")
        self.atoms = as_atoms(atoms)
        self.atoms.calc = make_calculator(model, device=device, dtype=dtype,
                                          on_isolated_atoms=on_isolated_atoms, compile=compile)
        self.ensemble, self.thermostat = ensemble, thermostat
        self.temperature, self.timestep, self.pressure = temperature, timestep, pressure
        self.loginterval = int(loginterval)
        self.max_volume_ratio = float(max_volume_ratio)
        self.rng = np.random.default_rng(seed)
        self.taut = 100.0 * timestep if taut is None else float(taut)
        self.taup = 1000.0 * timestep if taup is None else float(taup)
        self.bulk_modulus = bulk_modulus

        if starting_temperature is not None:
            from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # renamed in recent ASE
                MaxwellBoltzmannDistribution(self.atoms, temperature_K=starting_temperature,
                                             rng=self.rng, force_temp=len(self.atoms) > 1)
            Stationary(self.atoms)
        self.dyn = self._integrator()
        self.v0 = float(self.atoms.get_volume())
        self._checked: int | None = None  # last step whose cell passed the check

        self.trajectory = (TrajectoryWriter(trajectory, self.atoms, append, overwrite=True)
                           if trajectory is not None else None)
        self.log = (TextLog(logfile, ["step", "time_ps", "Etot_eV", "Epot_eV", "Ekin_eV", "T_K",
                                      "P_GPa", "volume_A3"], append, overwrite=True)
                    if logfile is not None else None)
        self.dyn.attach(self._check, interval=1)
        self.dyn.attach(self._write, interval=self.loginterval)

    # ------------------------------------------------------------------------------------------
    def _integrator(self) -> Any:
        atoms, dt = self.atoms, self.timestep * units.fs
        t, tdamp, pdamp = self.temperature, self.taut * units.fs, self.taup * units.fs
        p_au = self.pressure * units.GPa
        kind = self.thermostat
        if self.ensemble == "nve":
            from ase.md.verlet import VelocityVerlet

            return VelocityVerlet(atoms, timestep=dt)
        if self.ensemble == "nvt":
            if kind == "langevin":
                from ase.md.langevin import Langevin

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # fixcm deprecation
                    return Langevin(atoms, timestep=dt, temperature_K=t, friction=1.0 / tdamp,
                                    fixcm=False, rng=self.rng)
            if kind == "nose-hoover":
                from ase.md.nose_hoover_chain import NoseHooverChainNVT

                return NoseHooverChainNVT(atoms, timestep=dt, temperature_K=t, tdamp=tdamp)
            if kind == "bussi":
                from ase.md.bussi import Bussi

                return Bussi(atoms, timestep=dt, temperature_K=t, taut=tdamp, rng=self.rng)
            from ase.md.nvtberendsen import NVTBerendsen

            return NVTBerendsen(atoms, timestep=dt, temperature_K=t, taut=tdamp)
        # npt
        if kind in ("mtk", "mtk-isotropic"):
            from ase.md.nose_hoover_chain import IsotropicMTKNPT, MTKNPT

            cls = MTKNPT if kind == "mtk" else IsotropicMTKNPT
            return cls(atoms, timestep=dt, temperature_K=t, pressure_au=p_au, tdamp=tdamp,
                       pdamp=pdamp)
        from ase.md.nptberendsen import Inhomogeneous_NPTBerendsen

        if self.bulk_modulus is None:
            self.bulk_modulus = estimate_bulk_modulus(atoms)
            if not (math.isfinite(self.bulk_modulus) and self.bulk_modulus > 0):
                warnings.warn(f"bulk modulus estimate failed ({self.bulk_modulus:.3g} GPa): using "
                              f"{FALLBACK_BULK_MODULUS} GPa for the barostat coupling; pass "
                              f"bulk_modulus= to set it", stacklevel=3)
                self.bulk_modulus = FALLBACK_BULK_MODULUS
        return Inhomogeneous_NPTBerendsen(atoms, timestep=dt, temperature_K=t, pressure_au=p_au,
                                          taut=tdamp, taup=pdamp,
                                          compressibility_au=1.0 / (self.bulk_modulus * units.GPa))

    # ------------------------------------------------------------------------------------------
    @property
    def nsteps(self) -> int:
        return int(self.dyn.nsteps)

    def _check(self) -> None:
        check_cell(self.atoms, self.v0, self.max_volume_ratio, self.nsteps)
        self._checked = self.nsteps

    def _write(self) -> None:
        if self.trajectory is not None:
            self.trajectory.write()
        if self.log is not None:
            a = self.atoms
            epot, ekin = float(a.get_potential_energy()), float(a.get_kinetic_energy())
            pressure = _pressure_gpa(a.calc.results.get("stress"))  # cached: no extra model call
            self.log.row([self.nsteps, self.nsteps * self.timestep * 1e-3, epot + ekin, epot, ekin,
                          float(a.get_temperature()), pressure, float(a.get_volume())])

    def attach(self, fn: Callable[[], Any], interval: int = 1) -> None:
        """Call ``fn()`` every ``interval`` steps (ASE observer)."""
        self.dyn.attach(fn, interval=interval)

    def _progress(self, progress: Progress) -> None:
        a = self.atoms
        progress.report(self.nsteps, lambda: (
            f"T {float(a.get_temperature()):.1f} K  Epot "
            f"{float(a.get_potential_energy()) / len(a):.5f} eV/atom  "
            f"t {self.nsteps * self.timestep * 1e-3:.3f} ps"))

    def run(self, steps: int) -> None:
        """Run ``steps`` MD steps. Errors (isolated atoms, atoms too close, a collapsing cell)
        raise ValueError naming the step; files hold every log interval before it."""
        progress = progress_from_verbose(
            self.verbose, f"md {self.ensemble.upper()} {self.atoms.get_chemical_formula()}",
            self.nsteps + steps)
        if progress is not None:
            self.dyn.attach(self._progress, interval=1, progress=progress)
        try:
            self._run(steps)
        finally:
            if progress is not None:  # detach: a later run() reports its own steps
                self.dyn.observers = [o for o in self.dyn.observers
                                      if o[0] != self._progress]

    def _run(self, steps: int) -> None:
        try:
            self.dyn.run(steps)
        except ValueError as exc:
            if "MD step" in str(exc):
                raise
            # the model failed on the geometry of the step after the last checked one; a broken
            # cell (e.g. a barostat step that crushed it) is the more useful message
            step = 0 if self._checked is None else self._checked + 1
            check_cell(self.atoms, self.v0, self.max_volume_ratio, step)
            raise ValueError(f"at MD step {step}: {exc}") from exc

    def close(self) -> None:
        """Close the trajectory and log files."""
        if self.trajectory is not None:
            self.trajectory.close()
        if self.log is not None:
            self.log.close()

    def __enter__(self) -> "MolecularDynamics":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# physics check


def nve_energy_drift(atoms: Any, model: Any = "0.3.0", *, steps: int = 1000, timestep: float = 1.0,
                     temperature: float = 300.0, seed: int = 0, **md_kwargs: Any) -> dict[str, float]:
    """Run NVE MD and measure how well the total energy is conserved.

    Velocities are drawn at ``2 × temperature`` (equipartition brings the run near
    ``temperature``). Returns ``drift`` (meV/atom/ps: slope of a least-squares line through the
    total energy of every step), ``max_dev`` (meV/atom: largest minus smallest total energy),
    ``mean_T`` (K), ``steps`` and ``ps``.
    """
    md = MolecularDynamics(atoms, model=model, ensemble="nve", timestep=timestep,
                           starting_temperature=2.0 * temperature, seed=seed, **md_kwargs)
    etot: list[float] = []
    temps: list[float] = []

    def record() -> None:
        etot.append(total_energy(md.atoms))
        temps.append(float(md.atoms.get_temperature()))

    md.attach(record, interval=1)
    md.run(steps)
    md.close()
    n = len(md.atoms)
    e = np.asarray(etot) / n * 1e3  # meV/atom
    t_ps = np.arange(e.size) * timestep * 1e-3
    return {"drift": float(np.polyfit(t_ps, e, 1)[0]), "max_dev": float(e.max() - e.min()),
            "mean_T": float(np.mean(temps)), "steps": float(steps), "ps": float(t_ps[-1])}
