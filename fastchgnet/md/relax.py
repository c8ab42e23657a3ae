"""Structure relaxation with a fastchgnet model (ASE optimisers).

:class:`StructOptimizer` relaxes positions and, by default, the cell (through ASE's
``FrechetCellFilter``) with FIRE, BFGS or any ASE optimiser. Convergence is judged on the real
quantities, not on the filter's generalised forces: the largest atomic force ``≤ fmax`` (eV/Å)
and, when the cell relaxes, the largest stress component ``≤ smax`` (GPa; measured from the target
``-pressure``). Trajectory and log files are written and flushed every ``loginterval`` steps.
It returns the :class:`~fastchgnet.sim.result.RelaxResult` of the batched relaxer as well.

Defaults are fastchgnet's own (``fmax=0.1`` eV/Å as chgnet's, ``smax=0.1`` GPa, FIRE,
``on_isolated_atoms="error"``); :mod:`fastchgnet.compat.chgnet` has chgnet's ``StructOptimizer``
with chgnet's arguments and behaviour.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from ase import units
from ase.stress import voigt_6_to_full_3x3_stress

from fastchgnet.md.calculator import as_atoms, make_calculator
from fastchgnet.md.dynamics import FrameRecorder, TextLog, TrajectoryWriter, refuse_existing
from fastchgnet.md.options import check_keywords, check_optimizer_keywords
from fastchgnet.md.progress import progress_from_verbose
from fastchgnet.sim.result import RelaxResult

__all__ = ["OPTIMIZERS", "RelaxResult", "StructOptimizer", "quiet_cell_filter_warnings",
           "relax_structure"]

OPTIMIZERS = ("FIRE", "BFGS", "LBFGS", "BFGSLineSearch", "LBFGSLineSearch", "MDMin", "GPMin")


def _optimizer_class(optimizer: Any) -> Any:
    if not isinstance(optimizer, str):
        return optimizer
    import ase.optimize

    names = {n.lower(): n for n in OPTIMIZERS}
    name = names.get(optimizer.lower())
    if name is None:
        raise ValueError(f"unknown optimizer {optimizer!r}: choose one of {OPTIMIZERS} or pass an "
                         f"ASE Optimizer class")
    return getattr(ase.optimize, name)


def _filter_class(cell_filter: Any) -> Any:
    if not isinstance(cell_filter, str):
        return cell_filter
    import ase.filters

    cls = getattr(ase.filters, cell_filter, None)
    if not isinstance(cls, type) or not issubclass(cls, ase.filters.Filter):
        raise ValueError(f"unknown cell filter {cell_filter!r}: use e.g. 'FrechetCellFilter', "
                         f"'ExpCellFilter', 'UnitCellFilter' or 'StrainFilter'")
    return cls


@contextlib.contextmanager
def quiet_cell_filter_warnings() -> Iterator[None]:
    """Within the block, hide scipy's ``logm result may be inaccurate`` RuntimeWarnings.

    ASE's ``FrechetCellFilter`` takes the matrix logarithm of the deformation gradient at every
    step; scipy warns when its own error estimate passes 1000 machine epsilons, which happens for
    deformations close to the identity and says nothing about the relaxation. Only that message is
    hidden, only inside the block (the command line wraps each relaxation in it).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="logm result may be inaccurate",
                                category=RuntimeWarning)
        yield


class StructOptimizer:
    """Relaxes structures with a fastchgnet model.

    Args:
        model: ``"0.3.0"``, a checkpoint path, a fastchgnet model, or an ASE calculator.
        optimizer: ``"FIRE"`` (default), ``"BFGS"``, ... or an ASE ``Optimizer`` class.
        device, dtype, on_isolated_atoms: for a calculator made here.
        compile: for a calculator made here: ``"auto"`` (default: eager until the model calls
            have taken about one compilation's time, then compiled), ``True`` or ``False``
            (see :class:`~fastchgnet.md.CHGNetCalculator`).

    ``model`` may also be a ``chgnet.model.CHGNet`` object (converted once). chgnet's keyword
    names (``optimizer_class``, ``use_device``...) raise a ``TypeError`` naming ours.
    """

    def __init__(self, model: Any = "0.3.0", optimizer: Any = "FIRE", *,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 on_isolated_atoms: str = "error", compile: bool | str = "auto",
                 **kwargs: Any) -> None:
        check_keywords("StructOptimizer", kwargs)
        self.calculator = make_calculator(model, device=device, dtype=dtype,
                                          on_isolated_atoms=on_isolated_atoms, compile=compile)
        self.optimizer_class = _optimizer_class(optimizer)

    def relax(
        self,
        atoms: Any,
        *,
        fmax: float = 0.1,
        smax: float = 0.1,
        steps: int = 500,
        relax_cell: bool = True,
        cell_filter: Any = "FrechetCellFilter",
        pressure: float = 0.0,
        trajectory: str | Path | None = None,
        logfile: str | Path | None = None,
        loginterval: int = 1,
        verbose: bool | float = False,
        overwrite: bool = False,
        **optimizer_kwargs: Any,
    ) -> RelaxResult:
        """Relax ``atoms`` (ASE ``Atoms``, relaxed in place, or a pymatgen ``Structure``).

        Returns a :class:`RelaxResult` with every field filled: ``structure`` of the input's
        type, ``atoms`` (the relaxed ``Atoms``, with the calculator), ``final_structure`` (pymatgen,
        with the ``magmom`` site property), ``trajectory`` (a :class:`FrameRecorder`).

        Args:
            fmax: force criterion (eV/Å): the largest atomic force.
            smax: stress criterion (GPa): the largest component of ``σ + pressure·I`` (only with
                ``relax_cell``).
            steps: at most this many optimiser steps.
            relax_cell: also relax the cell (through ``cell_filter``).
            cell_filter: an ``ase.filters`` class or its name (default ``FrechetCellFilter``).
            pressure: external hydrostatic pressure (GPa).
            trajectory, logfile: files written (and flushed) every ``loginterval`` steps; the
                trajectory is ``.traj`` (ASE) or ``.xyz``/``.extxyz``.
            overwrite: replace existing ``trajectory``/``logfile`` files; without it an existing
                non-empty file is a ``FileExistsError`` (an earlier result is never lost).
            verbose: progress lines on stderr (step, energy, max|F|, max|σ|): ``True`` at most
                every 2 s (and the last step), a number: that interval in seconds (0: every step).
            **optimizer_kwargs: passed to the optimiser (e.g. ``maxstep``); a keyword the optimiser
                does not take is a ``TypeError`` before anything runs (chgnet's ``save_path``,
                ``ase_filter``... name their fastchgnet equivalents).
        """
        from ase.optimize.optimize import Optimizer

        check_optimizer_keywords("StructOptimizer.relax", self.optimizer_class, optimizer_kwargs,
                                 reserved=("logfile",))
        if fmax <= 0 or (relax_cell and smax <= 0) or loginterval < 1:
            raise ValueError("fmax and smax must be > 0 and loginterval >= 1")
        for path in (trajectory, logfile):  # before any work: a refusal leaves nothing half-written
            if path is not None:
                refuse_existing(Path(path), False, overwrite)
        given = atoms
        atoms = as_atoms(given)
        atoms.calc = self.calculator
        target = atoms
        if relax_cell:
            extra = {"scalar_pressure": pressure * units.GPa} if pressure else {}
            target = _filter_class(cell_filter)(atoms, **extra)
        opt: Optimizer = self.optimizer_class(target, logfile=None, **optimizer_kwargs)
        progress = progress_from_verbose(verbose, f"relax {atoms.get_chemical_formula()}", steps)
        record = FrameRecorder(atoms)
        writer = TrajectoryWriter(trajectory, atoms, overwrite=True) if trajectory is not None else None
        log = (TextLog(logfile, ["step", "energy_eV", "fmax_eV/A", "smax_GPa", "volume_A3"],
                       overwrite=True) if logfile is not None else None)
        converged, n, f_now, s_now = False, 0, float("inf"), float("inf")
        try:
            # fmax=0: the optimiser never stops on its own (generalised) forces; we judge
            for n, _ in enumerate(opt.irun(fmax=0.0, steps=steps)):
                f_now = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
                s_now = _stress_residual(atoms, pressure) if relax_cell else 0.0
                converged = f_now <= fmax and s_now <= smax
                if progress is not None:
                    progress.report(n, lambda: _progress_fields(atoms, f_now, s_now, relax_cell),
                                    last=converged)
                if n % loginterval == 0 or converged:
                    record.record(n)
                    if writer is not None:
                        writer.write()
                    if log is not None:
                        log.row([n, float(atoms.get_potential_energy()), f_now, s_now,
                                 float(atoms.get_volume())])
                if converged:
                    break
        finally:
            if writer is not None:
                writer.close()
            if log is not None:
                log.close()
        final = _structure_with_magmoms(atoms)
        voigt = atoms.calc.results.get("stress")
        return RelaxResult(structure=atoms if atoms is given else final,
                           energy=float(atoms.get_potential_energy()), converged=converged, steps=n,
                           forces=np.array(atoms.get_forces()),
                           stress=(None if voigt is None else _full_stress(voigt) / units.GPa),
                           fmax=f_now, smax=s_now, atoms=atoms, final_structure=final,
                           trajectory=record)


def _full_stress(stress: Any) -> np.ndarray:
    """3x3 from an ASE calculator's stress, Voigt (6,) or already 3x3 (chgnet's calculator)."""
    stress = np.asarray(stress, dtype=float)
    return stress if stress.shape == (3, 3) else voigt_6_to_full_3x3_stress(stress)


def _progress_fields(atoms: Any, f_now: float, s_now: float, relax_cell: bool) -> str:
    text = (f"E {float(atoms.get_potential_energy()) / len(atoms):.5f} eV/atom  "
            f"max|F| {f_now:.4f} eV/A")
    return text + (f"  max|s| {s_now:.4f} GPa" if relax_cell else "")


def _stress_residual(atoms: Any, pressure: float) -> float:
    """Largest |σ_ij + p δ_ij| (GPa) with σ from the calculator (positive = tensile)."""
    voigt = np.asarray(atoms.get_stress(), dtype=np.float64) / units.GPa
    voigt[:3] += pressure
    return float(np.abs(voigt).max())


def _structure_with_magmoms(atoms: Any) -> Any:
    from pymatgen.io.ase import AseAtomsAdaptor

    plain = atoms.copy()  # without calculator and arrays pymatgen would turn into site properties
    for key in list(plain.arrays):
        if key not in ("numbers", "positions"):
            del plain.arrays[key]
    struct = AseAtomsAdaptor.get_structure(plain)
    magmoms = atoms.calc.results.get("magmoms") if atoms.calc is not None else None
    if magmoms is not None:
        struct.add_site_property("magmom", [float(m) for m in magmoms])
    return struct


def relax_structure(structure: Any, model: Any = "0.3.0", *, optimizer: Any = "FIRE",
          device: str | torch.device | None = None, **kwargs: Any) -> RelaxResult:
    """Relax one structure: ``StructOptimizer(model, optimizer, device=device).relax(structure,
    **kwargs)``."""
    return StructOptimizer(model, optimizer, device=device).relax(structure, **kwargs)
