"""chgnet's ``chgnet.model.dynamics``: calculator, relaxation, MD and equation of state.

Same names, arguments, defaults and outputs as chgnet 0.4.2, running fastchgnet's model:

* :class:`CHGNetCalculator` — fastchgnet's ASE calculator with chgnet's arguments
  (``use_device``, ``check_cuda_mem``, ``stress_weight``, ``on_isolated_atoms="warn"``,
  ``return_site_energies``) and ``results["crystal_fea"]``;
* :class:`StructOptimizer` — ``relax(...)`` returns ``{"final_structure", "trajectory"}``, stops as
  chgnet does (ASE's ``fmax`` on the filter's forces) and writes chgnet's pickles (``save_path``,
  ``crystal_feas_save_path``);
* :class:`MolecularDynamics` — chgnet's ensembles and thermostats (default NVT Berendsen, 2 fs),
  with ASE's trajectory and log files as chgnet writes them;
* :class:`EquationOfState` — Birch–Murnaghan fit of relaxed strained cells.

Unknown keyword arguments raise ``TypeError`` (chgnet forwards some to ASE, which fails later or
stores them silently).
"""

from __future__ import annotations

import inspect
import pickle
import warnings
from typing import Any, Literal

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import BaseCalculator, Calculator, all_changes

from fastchgnet.compat.chgnet.model.model import CHGNet
from fastchgnet.compat.chgnet.utils.common_utils import determine_device
from fastchgnet.md.calculator import CHGNetCalculator as _Calculator
from fastchgnet.md.options import (ASE_CALCULATOR_KEYWORDS, check_keywords,
                                   check_optimizer_keywords)
from fastchgnet.model.weights import is_chgnet_model

__all__ = ["OPTIMIZERS", "CHGNetCalculator", "CrystalFeasObserver", "EquationOfState",
           "MolecularDynamics", "StructOptimizer", "TrajectoryObserver"]

Isolated = Literal["ignore", "warn", "error"]

#: chgnet's optimiser names -> ``ase.optimize`` class names
OPTIMIZERS = {name: name for name in ("FIRE", "BFGS", "LBFGS", "LBFGSLineSearch", "MDMin",
                                      "SciPyFminCG", "SciPyFminBFGS", "BFGSLineSearch")}


def _optimizer(name_or_class: Any) -> Any:
    if not isinstance(name_or_class, str):
        return name_or_class
    if name_or_class not in OPTIMIZERS:
        raise ValueError(f"Optimizer instance not found. Select from {list(OPTIMIZERS)}")
    import ase.optimize
    import ase.optimize.sciopt

    module = ase.optimize.sciopt if name_or_class.startswith("SciPy") else ase.optimize
    return getattr(module, name_or_class)


def _structure(atoms: Any) -> Any:
    from pymatgen.io.ase import AseAtomsAdaptor

    return AseAtomsAdaptor.get_structure(atoms)


def _atoms(structure: Any) -> Atoms:
    if isinstance(structure, Atoms):
        return structure
    from pymatgen.io.ase import AseAtomsAdaptor

    return AseAtomsAdaptor().get_atoms(structure)


# ----------------------------------------------------------------------------------------------
# calculator


class CHGNetCalculator(_Calculator):
    """chgnet's ``CHGNetCalculator`` on fastchgnet.

    Args:
        model: a ``CHGNet`` (this package's, chgnet's own object, or any fastchgnet model); None
            loads the pretrained 0.3.0 model.
        use_device: ``"cpu"``, ``"cuda"``, ``"mps"``...; None: chgnet's choice
            (:func:`~fastchgnet.compat.chgnet.utils.determine_device`).
        check_cuda_mem: use the CUDA device with the most free memory.
        stress_weight: factor from GPa to ``results["stress"]`` (default ``ase.units.GPa``:
            eV/Å³).
        on_isolated_atoms: ``"warn"`` (default), ``"ignore"`` or ``"error"``.
        return_site_energies: also ``results["energies"]`` (eV per site).
        **kwargs: ASE ``Calculator`` arguments (``label``, ``directory``, ...); anything else is a
            ``TypeError``.

    ``results`` also holds ``crystal_fea`` (the crystal feature vector), as in chgnet; the stress
    is ASE's Voigt vector (chgnet stores a 3×3 matrix that ASE converts on ``get_stress``).
    """

    def __init__(self, model: Any = None, *, use_device: str | None = None,
                 check_cuda_mem: bool = False, stress_weight: float = units.GPa,
                 on_isolated_atoms: Isolated = "warn", return_site_energies: bool = False,
                 **kwargs: Any) -> None:
        check_keywords("CHGNetCalculator", kwargs, ASE_CALCULATOR_KEYWORDS, hints=False)
        device = determine_device(use_device=use_device, check_cuda_mem=check_cuda_mem)
        if model is None:
            model = CHGNet.load(use_device=device, verbose=False)
        elif is_chgnet_model(model):
            model = CHGNet.adopt(model)
        super().__init__(model, device=device, on_isolated_atoms=on_isolated_atoms, **kwargs)
        converter = getattr(self.model, "graph_converter", None)
        if converter is not None:  # chgnet sets the model's converter too
            converter.set_isolated_atom_response(on_isolated_atoms)
        self.stress_weight = stress_weight
        self._stress_scale = float(stress_weight)
        self.return_site_energies = return_site_energies
        self._crystal_feas = True

    @classmethod
    def from_file(cls, path: str, use_device: str | None = None, **kwargs: Any) -> "CHGNetCalculator":
        """A calculator of the model in a checkpoint file (see :meth:`CHGNet.from_file`)."""
        return cls(model=CHGNet.from_file(path), use_device=use_device, **kwargs)

    def calculate(self, atoms: Any = None, properties: list | None = None,
                  system_changes: list | None = None, task: str = "efsm") -> None:
        """Compute the outputs of ``task`` (default all: energy, forces, stress, magmoms)."""
        saved = self.task
        self.task = task
        try:
            super().calculate(atoms, ["energy"], system_changes or all_changes)
        finally:
            self.task = saved
        if not self.return_site_energies:
            self.results.pop("energies", None)


def _as_calculator(model: Any, use_device: str | None, stress_weight: float,
                   on_isolated_atoms: Isolated) -> Calculator:
    if isinstance(model, (Calculator, BaseCalculator)):
        return model
    return CHGNetCalculator(model=model, use_device=use_device, stress_weight=stress_weight,
                            on_isolated_atoms=on_isolated_atoms)


# ----------------------------------------------------------------------------------------------
# observers


class TrajectoryObserver:
    """Records energy, forces, stress (Voigt, eV/Å³), magmoms, positions and cell of ``atoms``
    each time it is called; ``save(filename)`` pickles them under chgnet's keys (``energy``,
    ``forces``, ``stresses``, ``magmoms``, ``atom_positions``, ``cell``, ``atomic_number``)."""

    def __init__(self, atoms: Atoms) -> None:
        self.atoms = atoms
        self.energies: list[float] = []
        self.forces: list[np.ndarray] = []
        self.stresses: list[np.ndarray] = []
        self.magmoms: list[np.ndarray] = []
        self.atom_positions: list[np.ndarray] = []
        self.cells: list[np.ndarray] = []

    def __call__(self) -> None:
        self.energies.append(self.compute_energy())
        self.forces.append(self.atoms.get_forces())
        self.stresses.append(self.atoms.get_stress())
        self.magmoms.append(self.atoms.get_magnetic_moments())
        self.atom_positions.append(self.atoms.get_positions())
        self.cells.append(self.atoms.get_cell()[:])

    def __len__(self) -> int:
        return len(self.energies)

    def compute_energy(self) -> float:
        """The potential energy (eV) of the current geometry."""
        return self.atoms.get_potential_energy()

    def save(self, filename: str) -> None:
        record = {"energy": self.energies, "forces": self.forces, "stresses": self.stresses,
                  "magmoms": self.magmoms, "atom_positions": self.atom_positions,
                  "cell": self.cells, "atomic_number": self.atoms.get_atomic_numbers()}
        with open(filename, "wb") as fh:
            pickle.dump(record, fh)


class CrystalFeasObserver:
    """Records ``calc.results["crystal_fea"]`` of ``atoms`` each time it is called; ``save``
    pickles ``{"crystal_feas": [...]}``."""

    def __init__(self, atoms: Atoms) -> None:
        self.atoms = atoms
        self.crystal_feature_vectors: list[np.ndarray] = []

    def __call__(self) -> None:
        self.crystal_feature_vectors.append(self.atoms.calc.results["crystal_fea"])

    def __len__(self) -> int:
        return len(self.crystal_feature_vectors)

    def save(self, filename: str) -> None:
        with open(filename, "wb") as fh:
            pickle.dump({"crystal_feas": self.crystal_feature_vectors}, fh)


# ----------------------------------------------------------------------------------------------
# relaxation


def _cell_filter(ase_filter: Any) -> Any:
    from ase import filters

    names = [n for n, c in inspect.getmembers(filters, inspect.isclass)
             if issubclass(c, filters.Filter)]
    if isinstance(ase_filter, str):
        if ase_filter not in names:
            raise ValueError(f"Invalid {ase_filter=}, must be one of {names}. ")
        return getattr(filters, ase_filter)
    return ase_filter


class StructOptimizer:
    """chgnet's ``StructOptimizer``: relaxes structures with an ASE optimiser.

    Args:
        model: a ``CHGNet``, a ``CHGNetCalculator`` (or any ASE calculator); None: pretrained 0.3.0.
        optimizer_class: an ASE optimiser class or one of :data:`OPTIMIZERS` (default ``"FIRE"``).
        use_device, stress_weight, on_isolated_atoms (default ``"warn"``): for the calculator
            made here.
    """

    def __init__(self, model: Any = None, optimizer_class: Any = "FIRE",
                 use_device: str | None = None, stress_weight: float = units.GPa,
                 on_isolated_atoms: Isolated = "warn") -> None:
        self.optimizer_class = _optimizer(optimizer_class)
        self.calculator = _as_calculator(model, use_device, stress_weight, on_isolated_atoms)

    @property
    def version(self) -> str | None:
        return getattr(self.calculator.model, "version", None)

    @property
    def n_params(self) -> int:
        return self.calculator.model.n_params

    def relax(self, atoms: Any, *, fmax: float | None = 0.1, steps: int | None = 500,
              relax_cell: bool | None = True, ase_filter: Any = "FrechetCellFilter",
              save_path: str | None = None, loginterval: int | None = 1,
              crystal_feas_save_path: str | None = None, verbose: bool = True,
              assign_magmoms: bool = True, **kwargs: Any) -> dict[str, Any]:
        """Relax until ASE's optimiser reports max force ≤ ``fmax`` (eV/Å; with ``relax_cell``,
        on the cell filter's generalised forces, as chgnet) or ``steps`` steps.

        Args:
            atoms: a pymatgen ``Structure`` (converted) or an ASE ``Atoms`` (relaxed in place).
            fmax, steps: ASE's convergence criterion and step limit (defaults 0.1, 500).
            relax_cell: relax the cell through ``ase_filter`` (an ``ase.filters`` class or name,
                default ``"FrechetCellFilter"``).
            save_path: pickle the trajectory record here (see :class:`TrajectoryObserver`).
            loginterval: steps between records (trajectory and crystal features).
            crystal_feas_save_path: pickle the crystal feature vectors here.
            verbose: print ASE's optimiser log to stdout (default True, as chgnet).
            assign_magmoms: give ``final_structure`` a ``magmom`` site property (and no other).
            **kwargs: the optimiser's own arguments (e.g. ``maxstep``); others raise TypeError.

        Returns:
            ``{"final_structure": Structure, "trajectory": TrajectoryObserver}``.
        """
        check_optimizer_keywords("StructOptimizer.relax", self.optimizer_class, kwargs,
                                 hints=False)
        filter_class = _cell_filter(ase_filter)
        atoms = _atoms(atoms)
        atoms.calc = self.calculator
        obs = TrajectoryObserver(atoms)
        feas = CrystalFeasObserver(atoms) if crystal_feas_save_path else None
        target = filter_class(atoms) if relax_cell else atoms
        kwargs.setdefault("logfile", "-" if verbose else None)
        optimizer = self.optimizer_class(target, **kwargs)
        optimizer.attach(obs, interval=loginterval)
        if feas is not None:
            optimizer.attach(feas, interval=loginterval)
        optimizer.run(fmax=fmax, steps=steps)
        obs()
        if save_path is not None:
            obs.save(save_path)
        if feas is not None:
            feas.save(crystal_feas_save_path)
        struct = _structure(atoms)
        if assign_magmoms:
            for key in list(struct.site_properties):
                struct.remove_site_property(property_name=key)
            struct.add_site_property("magmom", [float(m) for m in atoms.get_magnetic_moments()])
        return {"final_structure": struct, "trajectory": obs}


# ----------------------------------------------------------------------------------------------
# molecular dynamics


def _nose_hoover_class() -> Any:
    try:  # ASE >= 3.26 name of the same integrator; the old one warns
        from ase.md.melchionna import MelchionnaNPT

        return MelchionnaNPT
    except ImportError:  # pragma: no cover - older ASE
        from ase.md.npt import NPT

        return NPT


def _is_upper_triangular(cell: np.ndarray) -> bool:
    return bool(abs(cell[1, 0]) < 1e-12 and abs(cell[2, 0]) < 1e-12 and abs(cell[2, 1]) < 1e-12)


class MolecularDynamics:
    """chgnet's ``MolecularDynamics`` on fastchgnet.

    Args (defaults are chgnet's):
        atoms: ASE ``Atoms`` (run in place) or pymatgen ``Structure``/``Molecule``.
        model: a ``CHGNet`` or an ASE calculator; None: pretrained 0.3.0.
        ensemble: ``"nve"``, ``"nvt"`` (default) or ``"npt"``.
        thermostat: ``"Berendsen_inhomogeneous"`` (default; with ``nvt`` any ``Berendsen*``
            name gives ASE's ``NVTBerendsen``), ``"Nose-Hoover"`` (ASE's Melchionna ``NPT``;
            the cell is made upper triangular), ``"NPT_Berendsen"`` (npt).
        temperature: K (300). starting_temperature: K, Maxwell–Boltzmann velocities (None: keep
            the momenta). timestep: fs (2.0). pressure: GPa (1.01325e-4).
        taut, taup: fs (100 × and 1000 × timestep). bulk_modulus: GPa, for the barostats; None
            fits it with :class:`EquationOfState` (2 GPa with a warning if that fails).
        trajectory, logfile, loginterval, append_trajectory: ASE's trajectory and log files.
        crystal_feas_logfile: pickle of the crystal feature vectors every ``loginterval`` steps.
        on_isolated_atoms (``"warn"``), return_site_energies, use_device: for the calculator made
            here.
    """

    def __init__(self, atoms: Any, *, model: Any = None, ensemble: str = "nvt",
                 thermostat: str = "Berendsen_inhomogeneous", temperature: int = 300,
                 starting_temperature: int | None = None, timestep: float = 2.0,
                 pressure: float = 1.01325e-4, taut: float | None = None,
                 taup: float | None = None, bulk_modulus: float | None = None,
                 trajectory: Any = None, logfile: str | None = None, loginterval: int = 1,
                 crystal_feas_logfile: str | None = None, append_trajectory: bool = False,
                 on_isolated_atoms: Isolated = "warn", return_site_energies: bool = False,
                 use_device: str | None = None) -> None:
        self.ensemble = ensemble
        self.thermostat = thermostat
        atoms = _atoms(atoms) if hasattr(atoms, "sites") else atoms
        if starting_temperature is not None:
            from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # renamed in recent ASE
                MaxwellBoltzmannDistribution(atoms, temperature_K=starting_temperature,
                                             force_temp=True)
            Stationary(atoms)
        self.atoms = atoms
        if isinstance(model, (Calculator, BaseCalculator)):
            self.atoms.calc = model
        else:
            self.atoms.calc = CHGNetCalculator(model=model, use_device=use_device,
                                               on_isolated_atoms=on_isolated_atoms,
                                               return_site_energies=return_site_energies)
        taut = 100 * timestep if taut is None else taut
        taup = 1000 * timestep if taup is None else taup
        files = dict(trajectory=trajectory, logfile=logfile, loginterval=loginterval,
                     append_trajectory=append_trajectory)
        dt, p_au = timestep * units.fs, pressure * units.GPa
        kind, th = ensemble.lower(), thermostat.lower()
        if kind == "nve":
            from ase.md.verlet import VelocityVerlet

            self.dyn = VelocityVerlet(self.atoms, timestep=dt, **files)
        elif kind == "nvt" and th == "nose-hoover":
            self.upper_triangular_cell()
            self.dyn = _nose_hoover_class()(self.atoms, timestep=dt, temperature_K=temperature,
                                            externalstress=p_au, ttime=taut * units.fs,
                                            pfactor=None, **files)
        elif kind == "nvt" and th.startswith("berendsen"):
            from ase.md.nptberendsen import NVTBerendsen

            self.dyn = NVTBerendsen(self.atoms, timestep=dt, temperature_K=temperature,
                                    taut=taut * units.fs, **files)
        elif kind == "npt" and th in ("nose-hoover", "berendsen_inhomogeneous", "npt_berendsen"):
            self.bulk_modulus = bulk_modulus  # as chgnet: set (and fitted if None) for NPT only
            compressibility_au = self._compressibility(atoms)
            if th == "nose-hoover":
                self.upper_triangular_cell()
                ptime = taup * units.fs
                self.dyn = _nose_hoover_class()(
                    self.atoms, timestep=dt, temperature_K=temperature, externalstress=p_au,
                    ttime=taut * units.fs, pfactor=self.bulk_modulus * units.GPa * ptime * ptime,
                    **files)
            else:
                from ase.md.nptberendsen import Inhomogeneous_NPTBerendsen, NPTBerendsen

                cls = Inhomogeneous_NPTBerendsen if th == "berendsen_inhomogeneous" else NPTBerendsen
                self.dyn = cls(self.atoms, timestep=dt, temperature_K=temperature,
                               pressure_au=p_au, taut=taut * units.fs, taup=taup * units.fs,
                               compressibility_au=compressibility_au, **files)
        elif kind in ("nvt", "npt"):
            raise ValueError("Thermostat not supported, choose in 'Nose-Hoover', 'Berendsen', "
                             "'Berendsen_inhomogeneous'")
        else:
            raise ValueError(f"ensemble must be 'nve', 'nvt' or 'npt', got {ensemble!r}")
        self.trajectory = trajectory
        self.logfile = logfile
        self.loginterval = loginterval
        self.timestep = timestep
        self.crystal_feas_logfile = crystal_feas_logfile

    def _compressibility(self, atoms: Any) -> float:
        """1 / bulk modulus in Å³/eV; fits the bulk modulus (GPa) when none was given."""
        if self.bulk_modulus is not None:
            return 1.0 / (self.bulk_modulus / 160.2176)
        try:
            eos = EquationOfState(model=self.atoms.calc)
            eos.fit(atoms=atoms, steps=500, fmax=0.1, verbose=False)
            self.bulk_modulus = eos.get_bulk_modulus(unit="GPa")
            return eos.get_compressibility(unit="A^3/eV")
        except Exception:  # chgnet's behaviour: any failure of the fit falls back to 2 GPa
            warnings.warn("Equation of State fitting failed, setting bulk modulus to 2 GPa; the "
                          "NPT run goes on with a possibly wrong pressure relaxation time. Pass "
                          "bulk_modulus= to set it.", stacklevel=3)
            self.bulk_modulus = 2.0
            return 1.0 / (2.0 / 160.2176)

    def run(self, steps: int) -> None:
        """Run ``steps`` MD steps (ASE's integrator)."""
        feas = None
        if self.crystal_feas_logfile:
            feas = CrystalFeasObserver(self.atoms)
            self.dyn.attach(feas, interval=self.loginterval)
        self.dyn.run(steps)
        if feas is not None:
            feas.save(self.crystal_feas_logfile)

    def set_atoms(self, atoms: Atoms) -> None:
        """Continue the run with ``atoms`` (keeping the calculator)."""
        calc = self.atoms.calc
        self.atoms = atoms
        self.dyn.atoms = atoms
        self.dyn.atoms.calc = calc

    def upper_triangular_cell(self, *, verbose: bool | None = False) -> None:
        """Rotate the cell (with the atoms) to upper-triangular form, which ASE's Nosé–Hoover
        ``NPT`` requires: c along z, b in the yz plane."""
        if _is_upper_triangular(np.asarray(self.atoms.get_cell()[:])):
            return
        a, b, c, alpha, beta, gamma = self.atoms.cell.cellpar()
        ca, cb, cg = np.cos(np.radians([alpha, beta, gamma]))
        sa = np.sin(np.radians(alpha))
        az = a * cb
        ay = a * (cg - ca * cb) / sa
        ax = np.sqrt(max(a * a - ay * ay - az * az, 0.0))
        self.atoms.set_cell([(ax, ay, az), (0.0, b * sa, b * ca), (0.0, 0.0, c)],
                            scale_atoms=True)
        if verbose:
            print("Transformed to upper triangular unit cell.", flush=True)


# ----------------------------------------------------------------------------------------------
# equation of state


class EquationOfState:
    """Bulk modulus from a Birch–Murnaghan fit of relaxed, isotropically strained cells.

    Args (chgnet's): model, optimizer_class (``"FIRE"``), use_device, stress_weight,
    on_isolated_atoms (``"error"``) — as for :class:`StructOptimizer`.
    """

    def __init__(self, model: Any = None, optimizer_class: Any = "FIRE",
                 use_device: str | None = None, stress_weight: float = units.GPa,
                 on_isolated_atoms: Isolated = "error") -> None:
        self.relaxer = StructOptimizer(model=model, optimizer_class=optimizer_class,
                                       use_device=use_device, stress_weight=stress_weight,
                                       on_isolated_atoms=on_isolated_atoms)
        self.fitted = False

    def fit(self, atoms: Any, *, n_points: int = 11, fmax: float | None = 0.1,
            steps: int | None = 500, verbose: bool | None = False, **kwargs: Any) -> None:
        """Relax the primitive cell of ``atoms``, then the positions of ``n_points`` copies
        strained by -10 % … +10 % per axis, and fit E(V)."""
        from pymatgen.analysis.eos import BirchMurnaghan

        structure = _structure(atoms) if isinstance(atoms, Atoms) else atoms
        relaxed = self.relaxer.relax(structure.get_primitive_structure(), relax_cell=True,
                                     fmax=fmax, steps=steps, verbose=verbose, **kwargs)
        volumes, energies = [], []
        for strain in np.linspace(-0.1, 0.1, n_points):
            strained = relaxed["final_structure"].copy()
            strained.apply_strain([strain, strain, strain])
            res = self.relaxer.relax(strained, relax_cell=False, fmax=fmax, steps=steps,
                                     verbose=verbose, **kwargs)
            volumes.append(res["final_structure"].volume)
            energies.append(res["trajectory"].energies[-1])
        self.bm = BirchMurnaghan(volumes=volumes, energies=energies)
        self.bm.fit()
        self.fitted = True

    def _check(self) -> None:
        if not self.fitted:
            raise ValueError("Equation of state needs to be fitted first through self.fit()")

    def get_bulk_modulus(self, unit: Literal["eV/A^3", "GPa"] = "eV/A^3") -> float:
        """The fitted bulk modulus in eV/Å³ (default) or GPa."""
        self._check()
        if unit == "eV/A^3":
            return self.bm.b0
        if unit == "GPa":
            return self.bm.b0_GPa
        raise ValueError("unit has to be eV/A^3 or GPa")

    def get_compressibility(self, unit: str = "A^3/eV") -> float:
        """1 / bulk modulus in Å³/eV (default), ``"GPa^-1"``, ``"Pa^-1"`` or ``"m^2/N"``."""
        self._check()
        if unit == "A^3/eV":
            return 1 / self.bm.b0
        if unit == "GPa^-1":
            return 1 / self.bm.b0_GPa
        if unit in ("Pa^-1", "m^2/N"):
            return 1 / (self.bm.b0_GPa * 1e9)
        raise NotImplementedError("unit has to be one of A^3/eV, GPa^-1 Pa^-1 or m^2/N")
