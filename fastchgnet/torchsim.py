"""fastchgnet models inside torch-sim: a ``torch_sim.models.interface.ModelInterface``.

:class:`FastCHGNetModel` takes torch-sim's batched ``SimState`` (or its state dict) and returns
torch-sim's keys and units. The crystal graphs of the whole batch are built on the state's
device in one pass (:class:`fastchgnet.data.device_graph.VerletGraph`, the neighbour list of
:class:`fastchgnet.sim.BatchPotential`, with a Verlet skin reused between MD / optimiser steps),
then one batched model call gives every system's outputs. There is no loop over systems or atoms.

Returned (torch-sim's conventions; tested with torch-sim-atomistic 0.3.0):

* ``"energy"`` (n_systems,) eV, the total energy of each system (CHGNet's eV/atom x atoms);
* ``"forces"`` (n_atoms, 3) eV/Å;
* ``"stress"`` (n_systems, 3, 3) eV/Å^3, positive = tensile (torch-sim's optimisers take
  ``virial = -V (stress + p)``, the sign of ASE and of fastchgnet; fastchgnet's GPa / 160.2177);
* ``"magmoms"`` (n_atoms,) μB, CHGNet's magnetic-moment magnitudes (an extra key).

torch-sim stores the cell with lattice vectors as *columns* (``state.cell``; rows are
``state.row_vector_cell``); fastchgnet's lattices have them as rows — converted here. The
per-atom system index is ``state.system_idx`` (torch-sim >= 0.3.0; older releases called it
``batch``: both are read). ``pbc`` may be a bool (0.3.0) or a per-axis tensor (later releases).

Install: ``pip install "fastchgnet[torchsim]"``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import Tensor

from fastchgnet.data.device_graph import VerletGraph
from fastchgnet.keys import ENERGY, FORCES, MAGMOMS, STRESS
from fastchgnet.model.predict import as_fastchgnet_model
from fastchgnet.model.weights import load_model
from fastchgnet.units import EV_A3_TO_GPA

try:
    from torch_sim.models.interface import ModelInterface
except ImportError as _exc:  # the module is the opt-in: fail at import, naming the extra
    raise ImportError('fastchgnet.torchsim needs torch-sim: pip install "fastchgnet[torchsim]" '
                      '(or pip install torch-sim-atomistic)') from _exc

__all__ = ["FastCHGNetModel", "TESTED_TORCH_SIM_VERSIONS"]

#: torch-sim-atomistic releases this interface was tested with
TESTED_TORCH_SIM_VERSIONS = ("0.3.0",)


def _resolve(model: Any, device: Any, dtype: torch.dtype | None) -> torch.nn.Module:
    """A fastchgnet model in eval mode: a pretrained name or a checkpoint path is loaded; a model
    object (fastchgnet, or a ``chgnet.model.CHGNet``, converted) is used as it is, moved only
    when ``device``/``dtype`` are given."""
    if isinstance(model, (str, os.PathLike)):
        dev = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        return load_model(model, device=dev, dtype=dtype).requires_grad_(False)
    net = as_fastchgnet_model(model)
    if device is not None or dtype is not None:
        net = net.to(device=device, dtype=dtype)
    return net.eval()


def _get(state: Any, *names: str) -> Any:
    for name in names:
        value = state.get(name) if isinstance(state, Mapping) else getattr(state, name, None)
        if value is not None:
            return value
    return None


class FastCHGNetModel(ModelInterface):
    """A fastchgnet model as a torch-sim model.

    Args:
        model: ``"0.3.0"`` (the published CHGNet weights), a checkpoint path, a fastchgnet model
            (exact, decoupled or heads) or a ``chgnet.model.CHGNet`` (converted).
        device: where to run (default: CUDA when available for a model loaded here, else the
            model's own device).
        dtype: parameter dtype (default: the model's; float32 for the published weights). Input
            states are cast to it.
        compute_forces, compute_stress: which outputs to compute (both by default).
        compute_magmoms: also return ``"magmoms"`` (cheap: one linear layer).
        skin: Verlet skin (Å) of the device neighbour list, reused while no atom moved more than
            ``skin / 2`` (0 rebuilds every call).
        on_isolated_atoms: ``"error"``, ``"warn"`` or ``"ignore"`` (see fastchgnet's graphs).
    """

    def __init__(self, model: Any = "0.3.0", *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, compute_forces: bool = True,
                 compute_stress: bool = True, compute_magmoms: bool = True, skin: float = 1.0,
                 on_isolated_atoms: str = "error") -> None:
        super().__init__()
        self.model = _resolve(model, device, dtype)
        p = next(self.model.parameters())
        self._device, self._dtype = p.device, p.dtype
        self._compute_forces = bool(compute_forces)
        self._compute_stress = bool(compute_stress)
        self.compute_magmoms = bool(compute_magmoms)
        self._memory_scales_with = "n_atoms_x_density"  # a radial cutoff (6 Å)
        self.verlet = VerletGraph.for_model(self.model, skin, on_isolated_atoms=on_isolated_atoms)

    # torch-sim's validation sets these when they are False: allow it
    @property
    def compute_forces(self) -> bool:
        return self._compute_forces

    @compute_forces.setter
    def compute_forces(self, value: bool) -> None:
        self._compute_forces = bool(value)

    @property
    def compute_stress(self) -> bool:
        return self._compute_stress

    @compute_stress.setter
    def compute_stress(self, value: bool) -> None:
        self._compute_stress = bool(value)

    def _task(self) -> str:
        task = "e" + ("f" if self._compute_forces else "") + ("s" if self._compute_stress else "")
        return task + ("m" if self.compute_magmoms else "")

    def forward(self, state: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Energies, forces, stresses and magnetic moments of a batched ``SimState`` (or a state
        dict with ``positions``, ``cell``, ``atomic_numbers``, ``system_idx`` (or ``batch``) and
        ``pbc``)."""
        positions = _get(state, "positions")
        cell = _get(state, "cell")
        numbers = _get(state, "atomic_numbers")
        if positions is None or cell is None or numbers is None:
            raise ValueError("the state needs positions, cell and atomic_numbers")
        dev, dt = self._device, self._dtype
        positions = positions.detach().to(device=dev, dtype=dt)
        cell = cell.detach().to(device=dev, dtype=dt)
        if cell.ndim == 2:
            cell = cell.unsqueeze(0)
        lattice = cell.transpose(1, 2)  # torch-sim: vectors are columns; ours: rows
        n_systems = lattice.shape[0]
        system_idx = _get(state, "system_idx", "batch")
        if system_idx is None:
            if n_systems != 1:
                raise ValueError(f"the state has {n_systems} cells but no system_idx")
            system_idx = torch.zeros(positions.shape[0], dtype=torch.int64, device=dev)
        system_idx = system_idx.to(device=dev, dtype=torch.int64)
        n_atoms = torch.zeros(n_systems, dtype=torch.int64, device=dev).index_add_(
            0, system_idx, torch.ones_like(system_idx))
        pbc = _get(state, "pbc")
        pbc = True if pbc is None else (pbc.to(dev) if isinstance(pbc, Tensor) else pbc)
        batch = self.verlet.update(numbers.to(device=dev, dtype=torch.int64), positions, lattice,
                                   n_atoms, pbc, atom_graph=system_idx)
        out = self.model(batch, task=self._task(), create_graph=False)
        energy = out[ENERGY]
        if self.model.config.is_intensive:
            energy = energy * n_atoms.to(energy.dtype)
        res: dict[str, Tensor] = {"energy": energy.detach()}
        if FORCES in out:
            res["forces"] = out[FORCES].detach()
        if STRESS in out:
            res["stress"] = out[STRESS].detach() / EV_A3_TO_GPA  # GPa -> eV/Å^3, same sign
        if MAGMOMS in out:
            res["magmoms"] = out[MAGMOMS].detach()
        return res
