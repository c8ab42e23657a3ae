"""ASE calculator for fastchgnet models.

``CHGNetCalculator`` gives ASE the total energy (eV), forces (eV/Å), stress (Voigt
``xx, yy, zz, yz, xz, xy`` in eV/Å³, positive = tensile, as ASE), magnetic moments (μB) and
per-site energies (eV) of any fastchgnet model: the exact and decoupled models, the heads model
and checkpoints of them. One forward pass per new geometry gives all properties, which are cached
by ASE until the atoms change.

Structures reach the model through one method, :meth:`CHGNetCalculator.atoms_to_batch`; the
graph is built on the host (``graph="host"``, :func:`fastchgnet.data.build_graph`) or on the
model's device with a Verlet-skin neighbour list reused between MD steps (``graph="device"``,
:mod:`fastchgnet.data.device_graph`; the default on CUDA).

The model call is compiled with Inductor when that pays (``compile="auto"``, the default: eager
until the model calls have taken about one compilation's time, then compiled; see
:mod:`fastchgnet.compile.auto`). ``compile=False`` keeps it eager, ``compile=True`` compiles at
the first call; ``calc.compile_report`` says what happened and what it cost.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.units import GPa

from fastchgnet.compile.auto import COMPILE_AFTER_S, CompileReport, GuardedForward
from fastchgnet.data.batch import Batch, collate
from fastchgnet.data.device_graph import make_builder
from fastchgnet.data.graph import build_graph
from fastchgnet.device import flush_denormals, resolve_device
from fastchgnet.keys import CRYSTAL_FEA, ENERGY, FORCES, MAGMOMS, SITE_ENERGIES, STRESS
from fastchgnet.md.options import ASE_CALCULATOR_KEYWORDS, check_keywords
from fastchgnet.model.weights import from_chgnet_model, is_chgnet_model, load_model

__all__ = ["CHGNetCalculator", "as_atoms", "make_calculator", "resolve_model", "voigt_stress"]

GRAPH_MODES = ("auto", "host", "device")
_LETTER = {"forces": "f", "stress": "s", "magmoms": "m"}  # ASE property -> model task letter


def resolve_model(model: Any = "0.3.0", device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A model in eval mode on ``device``.

    Args:
        model: a pretrained name (``"0.3.0"``), a checkpoint path, a fastchgnet model, or a
            ``chgnet.model.CHGNet`` object (its weights are converted to an exact fastchgnet
            model once, here; the chgnet object is not used afterwards).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``; None: CUDA when available for a
            model loaded here (its parameters then need no gradients), the model's own device for a
            model passed in (a chgnet object's device for one converted here).
        dtype: parameter dtype (e.g. ``torch.float64``); None keeps the model's (float32 for the
            published weights).
    """
    if is_chgnet_model(model):
        own = next(model.parameters()).device
        net = from_chgnet_model(model).requires_grad_(False)
        return resolve_model(net, own if device is None else device, dtype)
    if isinstance(model, torch.nn.Module):
        if device is not None:
            model = model.to(resolve_device(str(device)))
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a pretrained name, a checkpoint path, a fastchgnet model or a "
                        f"chgnet CHGNet, got {type(model).__name__}")
    net = load_model(model, device=resolve_device(None if device is None else str(device)),
                     dtype=dtype)
    # inference only: without parameter gradients autograd keeps less for the force pass
    # (a model passed in is left as it is: it may be trained further)
    return net.requires_grad_(False)


def _voigt(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    return s[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]


def voigt_stress(s_gpa: np.ndarray) -> np.ndarray:
    """(3, 3) stress in GPa -> ASE Voigt (xx, yy, zz, yz, xz, xy) in eV/Å³ (same sign)."""
    return _voigt(s_gpa) * GPa


class CHGNetCalculator(Calculator):
    """ASE calculator of a fastchgnet model.

    Args:
        model: ``"0.3.0"`` (default), a checkpoint path, a fastchgnet model (any model type), or a
            ``chgnet.model.CHGNet`` object (converted, see :func:`resolve_model`).
        device: ``"cpu"``, ``"cuda"``, ``"auto"``...; None as in :func:`resolve_model`.
        dtype: e.g. ``torch.float64`` for smooth finite differences (default: the model's dtype).
        on_isolated_atoms: an atom without a neighbour within the 6 Å cutoff raises ValueError
            (``"error"``, default), warns (``"warn"``) or is kept silently (``"ignore"``); a kept
            atom's energy depends on its element only.
        graph: ``"host"`` builds graphs with :func:`fastchgnet.data.build_graph`; ``"device"``
            with ``fastchgnet.data.device_graph`` on the model's device, reusing a Verlet
            neighbour list (pairs within cutoff + ``skin``) while no atom has moved more than
            ``skin / 2``; ``"auto"``: the device graph on CUDA, the host graph on the CPU.
        skin: Verlet skin (Å) of the device graph; 0 rebuilds the neighbour list at every call.
        task: the outputs computed per call (``"efsm"`` default; ``"ef"`` skips stress and
            magnetic moments, e.g. for NVE/NVT MD where only forces matter).
        forward: replaces the model call: ``forward(batch, task) -> outputs``, e.g.
            ``fastchgnet.compile.CompiledForward(model)`` or ``CUDAGraphForward(model)``
            (without per-site energies in its outputs, ``energies`` is not available). A
            ``forward`` given here is used as it is: ``compile`` does not apply to it.
        compile: ``"auto"`` (default), ``True``/``"always"`` or ``False``/``"never"``: whether the
            model call runs through ``torch.compile`` (Inductor, dynamic shapes: no
            recompilation when the numbers of atoms, bonds or angles change). ``"auto"`` runs
            eagerly until the model calls have taken ``compile_after_s`` seconds in total and
            then compiles, so single points and short relaxations never wait for a compilation
            and long MD runs get the faster call. Without a usable compiler (no C++ compiler
            for the CPU, no Triton for CUDA), or when a compiled call fails, the calculator
            runs eagerly and logs one warning on the ``"fastchgnet"`` logger. The environment
            variable ``FASTCHGNET_COMPILE`` (``auto``, ``always``, ``never``) overrides the
            ``"auto"`` default.
        compile_after_s: seconds of eager model calls before ``"auto"`` compiles (default 60, about
            one compilation on a 2-core CPU).
        max_compiles: at most this many compilations (a new task string is one, sizes are not);
            past it, a call that would need another runs eagerly.
        **kwargs: ASE's own ``Calculator`` arguments (``label``, ``directory``, ``restart``,
            ``ignore_bad_restart_file``, ``atoms``). Any other keyword is a ``TypeError``; chgnet's
            names (``use_device``, ``stress_weight``...) get a message naming the fastchgnet
            equivalent. :mod:`fastchgnet.compat.chgnet` takes chgnet's arguments unchanged.

    Results (``calc.results``): ``energy`` and ``free_energy`` (eV, total), ``forces`` (n, 3)
    eV/Å, ``stress`` (6,) eV/Å³ Voigt, ``magmoms`` (n,) μB, ``energies`` (n,) eV per site.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "magmoms", "energies"]

    def __init__(
        self,
        model: Any = "0.3.0",
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        on_isolated_atoms: str = "error",
        graph: str = "auto",
        skin: float = 1.0,
        task: str = "efsm",
        forward: Callable[[Batch, str], dict[str, torch.Tensor]] | None = None,
        compile: bool | str = "auto",
        compile_after_s: float = COMPILE_AFTER_S,
        max_compiles: int = 4,
        **kwargs: Any,
    ) -> None:
        check_keywords(type(self).__name__, kwargs, ASE_CALCULATOR_KEYWORDS)
        super().__init__(**kwargs)
        if on_isolated_atoms not in ("error", "warn", "ignore"):
            raise ValueError(f"on_isolated_atoms must be 'error', 'warn' or 'ignore', "
                             f"got {on_isolated_atoms!r}")
        if graph not in GRAPH_MODES:
            raise ValueError(f"graph must be one of {GRAPH_MODES}, got {graph!r}")
        if "e" not in task:
            raise ValueError(f"task must include the energy 'e', got {task!r}")
        self.model = resolve_model(model, device, dtype)
        self.on_isolated_atoms = on_isolated_atoms
        self.task = task
        self.skin = float(skin)
        self.forward = forward
        if compile == "auto":
            compile = os.environ.get("FASTCHGNET_COMPILE", "auto") or "auto"
        # the model call, eager or compiled (the guard decides; see fastchgnet.compile.auto)
        self._guard = GuardedForward(self._eager_call, device=self.device, policy=compile,
                                     compile_after_s=compile_after_s, max_compiles=max_compiles)
        self.graph_mode = self._pick_graph_mode(graph)
        self.n_calls = 0  # model evaluations, for tests and logs
        self._device_graph: Any = None
        # for subclasses (fastchgnet.compat.chgnet): the factor from the model's GPa stress to
        # results["stress"], and whether results carry the crystal feature vector
        self._stress_scale = GPa
        self._crystal_feas = False

    # ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def version(self) -> str | None:
        return getattr(self.model, "version", None)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def compile_report(self) -> CompileReport | None:
        """What compiling the model call cost and gave (mode, compilations, their seconds, compiled
        and eager calls); None when a ``forward`` replaces the model call."""
        return None if self.forward is not None else self._guard.report

    def _pick_graph_mode(self, graph: str) -> str:
        if graph == "auto":
            return "device" if self.device.type == "cuda" else "host"
        return graph

    # ------------------------------------------------------------------------------------------
    def atoms_to_batch(self, atoms: Any) -> Batch:
        """The model's input for one ``Atoms`` (or pymatgen ``Structure``) on the model's device.

        The only place where structures become graphs: host graphs are built with
        :func:`fastchgnet.data.build_graph` and collated; device graphs come from
        ``fastchgnet.data.device_graph`` (with its Verlet-skin reuse between MD steps).

        Raises:
            ValueError naming the structure (its formula) and the problem: isolated atoms (per
            ``on_isolated_atoms``), atoms closer than 0.5 Å, unknown elements, a singular cell.
        """
        if self.graph_mode == "device":
            return self._device_batch(atoms)
        graph = build_graph(atoms, graph_id=_label(atoms), on_isolated_atoms=self.on_isolated_atoms,
                            **self.model.graph_kwargs())
        return collate([graph], dtype=self.dtype).to(self.device)

    def _device_batch(self, atoms: Any) -> Batch:
        if self._device_graph is None:
            self._device_graph = make_builder(
                self.model, skin=self.skin, on_isolated_atoms=self.on_isolated_atoms)
        self._device_graph.verlet.names = [_label(atoms)]  # error messages name the structure
        return self._device_graph(atoms)

    def predict_batch(self, batch: Batch, task: str | None = None) -> dict[str, torch.Tensor]:
        """Raw model outputs (tensors on the device) for a batch, with per-site energies unless
        a ``forward`` replaces the model call."""
        if self.forward is not None:
            return self.forward(batch, task or self.task)
        with flush_denormals(self.device):
            return self._guard(batch, task or self.task)

    def _eager_call(self, batch: Batch, task: str) -> dict[str, torch.Tensor]:
        return self.model(batch, task=task, create_graph=False, return_site_energies=True,
                          return_crystal_feas=self._crystal_feas)

    def calculate(self, atoms: Any = None, properties: Sequence[str] | None = None,
                  system_changes: Sequence[str] = all_changes) -> None:
        """Compute every property of :attr:`task` for ``atoms`` (one forward pass)."""
        super().calculate(atoms, properties or ["energy"], system_changes)
        atoms = self.atoms
        # the configured outputs plus any requested ones, in the model's "efsm" order
        wanted = set(self.task) | {_LETTER[p] for p in properties or () if p in _LETTER}
        task = "".join(k for k in "efsm" if k in wanted)
        out = self.predict_batch(self.atoms_to_batch(atoms), task)
        self.n_calls += 1
        n = len(atoms)
        # one device -> host copy per output at the ASE boundary
        arr = {k: v.detach().to("cpu", torch.float64).numpy() for k, v in out.items()
               if k in (ENERGY, FORCES, STRESS, MAGMOMS, SITE_ENERGIES, CRYSTAL_FEA)}
        e = float(arr[ENERGY][0])
        energy = e * n if self.model.config.is_intensive else e
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        if SITE_ENERGIES in arr:
            self.results["energies"] = arr[SITE_ENERGIES]
        if FORCES in arr:
            self.results["forces"] = arr[FORCES]
        if STRESS in arr:
            self.results["stress"] = _voigt(arr[STRESS][0]) * self._stress_scale
        if MAGMOMS in arr:
            self.results["magmoms"] = arr[MAGMOMS]
        if CRYSTAL_FEA in arr:
            self.results["crystal_fea"] = arr[CRYSTAL_FEA][0]

    def get_magnetic_moments(self, atoms: Any = None) -> np.ndarray:
        """Per-site magnetic moment magnitudes (μB)."""
        return self.get_property("magmoms", atoms)


def _label(atoms: Any) -> str:
    """A short name of a structure for error messages (its formula)."""
    if hasattr(atoms, "get_chemical_formula"):
        return atoms.get_chemical_formula()
    comp = getattr(atoms, "composition", None)
    return comp.formula.replace(" ", "") if comp is not None else type(atoms).__name__


def as_atoms(structure: Any) -> Any:
    """An ASE ``Atoms`` for a pymatgen ``Structure`` (converted) or an ``Atoms`` (as is)."""
    if isinstance(structure, Atoms):
        return structure
    if hasattr(structure, "lattice") and hasattr(structure, "sites"):
        from pymatgen.io.ase import AseAtomsAdaptor

        return AseAtomsAdaptor.get_atoms(structure)
    raise TypeError(f"expected an ASE Atoms or a pymatgen Structure, got {type(structure).__name__}")


def make_calculator(model: Any = "0.3.0", *, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, on_isolated_atoms: str = "error",
                    compile: bool | str = "auto", **kwargs: Any) -> Calculator:
    """``model`` itself when it is an ASE calculator, else a :class:`CHGNetCalculator` of it
    (a pretrained name, a checkpoint path, a fastchgnet model or a chgnet ``CHGNet``)."""
    if isinstance(model, Calculator):
        return model
    return CHGNetCalculator(model, device=device, dtype=dtype, on_isolated_atoms=on_isolated_atoms,
                            compile=compile, **kwargs)
