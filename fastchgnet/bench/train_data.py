"""Labelled MPtrj-like training batches for the training benchmarks (:mod:`.train_step`,
:mod:`.trainer_epochs`, :mod:`.memory`).

Structures: cells from the shared CIFs (LiMnO2, 8 atoms; Li9Co7O16, 32 atoms; supercells up to
``max_atoms``, transition metal varied, strained and rattled), or built-in prototypes
(:func:`fastchgnet.data.prototypes.random_structures`) when the CIFs are absent. Labels are the
0.3.0 model's predictions plus Gaussian noise, so that a loss is realistic in size and its
gradients are not zero.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pymatgen.core import Lattice, Structure

from fastchgnet.bench.common import CIF_LICOO, CIF_LIMNO2, load_our_model, structures_dir
from fastchgnet.data.prototypes import random_structures

__all__ = ["TrainData", "chgnet_like_batch", "default_max_atoms"]

# label noise added to the model's predictions (eV/atom, eV/Å, GPa, μB)
_NOISE = {"e": 0.02, "f": 0.05, "s": 0.2, "m": 0.05}

# supercells of the two shared cells making up the MPtrj-like pool: a cell is drawn first (each
# with equal chance), then one of its supercells; with max_atoms = 64 a batch of 64 structures
# averages about 40 atoms, 2000 undirected bonds and 8000 angles per structure
_POOL = {
    "LiMnO2": ((1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 2, 2), (2, 2, 2)),
    "Li9Co7O16": ((1, 1, 1), (1, 1, 2), (2, 1, 1)),
}
_CIFS = {"LiMnO2": CIF_LIMNO2, "Li9Co7O16": CIF_LICOO}
_TRANSITION_METALS = ("Mn", "Fe", "Co", "Ni")


def default_max_atoms(device: str) -> int:
    """Largest structure of the pool: 64 atoms on CUDA; 16 on the CPU (LiMnO2 and its 2-cell
    supercells: a CPU step of 8 such structures takes seconds in chgnet)."""
    return 64 if str(device).startswith("cuda") else 16


@dataclass
class TrainData:
    """Structures of one training batch and their labels (numpy, one entry per structure)."""

    structures: list
    energy: np.ndarray  # (B,) eV/atom
    forces: list  # (n_i, 3) eV/Å
    stress: list  # (3, 3) GPa
    magmom: list  # (n_i,) μB
    source: str  # "cif" or "prototypes"
    seed: int

    def __len__(self) -> int:
        return len(self.structures)

    @property
    def n_atoms(self) -> int:
        return sum(len(s) for s in self.structures)

    def label_dicts(self) -> list[dict[str, Any]]:
        """One ``{e, f, s, m}`` dict per structure (the input of
        :func:`fastchgnet.train.loss.collate_targets`)."""
        return [{"e": float(e), "f": f, "s": s, "m": m}
                for e, f, s, m in zip(self.energy, self.forces, self.stress, self.magmom)]

    def label_tensors(self, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Concatenated labels: ``e`` (B,), ``f`` (N, 3), ``s`` (B, 3, 3), ``m`` (N,)."""
        def t(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype).to(device)

        return {"e": t(self.energy), "f": t(np.concatenate(self.forces)),
                "s": t(np.stack(self.stress)), "m": t(np.concatenate(self.magmom))}


def _cif_structures(n: int, rng: np.random.Generator, max_atoms: int) -> list | None:
    folder = structures_dir()
    if folder is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cells = {name: Structure.from_file(str(folder / file)) for name, file in _CIFS.items()}
    pool = {name: [r for r in reps if len(cells[name]) * int(np.prod(r)) <= max_atoms]
            for name, reps in _POOL.items()}
    pool = {name: reps for name, reps in pool.items() if reps}
    if not pool:  # max_atoms below the smallest cell: the smallest cell alone
        pool = {"LiMnO2": [(1, 1, 1)]}
    names = sorted(pool)
    out = []
    for _ in range(n):
        name = names[int(rng.integers(len(names)))]
        reps = pool[name][int(rng.integers(len(pool[name])))]
        s = cells[name] * reps
        s.remove_oxidation_states()
        # vary the transition metal (same structure type: the graph stays MPtrj-like)
        tm = str(rng.choice(_TRANSITION_METALS))
        s.replace_species({el: tm for el in {sp.symbol for sp in s.species}
                           if el in _TRANSITION_METALS and el != tm})
        eps = rng.uniform(-0.02, 0.02, (3, 3))
        eps = (eps + eps.T) / 2
        lat = Lattice(s.lattice.matrix @ (np.eye(3) + eps))
        s = Structure(lat, s.species, s.frac_coords)
        s = Structure(s.lattice, s.species,
                      s.cart_coords + rng.normal(0.0, 0.04, (len(s), 3)),
                      coords_are_cartesian=True)
        out.append(s)
    return out


@functools.lru_cache(maxsize=1)
def _label_model() -> Any:
    """The 0.3.0 model on the CPU, used only to make labels (kept apart from trained models)."""
    return load_our_model("cpu")[0]


def chgnet_like_batch(n_structures: int, seed: int = 0, *, max_atoms: int = 64,
                      label_model: Any = None) -> TrainData:
    """``n_structures`` MPtrj-like structures with synthetic labels (deterministic in ``seed``).

    Structures: the shared CIFs (supercells up to ``max_atoms`` atoms, transition metal varied,
    strained ±2 %, rattled 0.04 Å) when present, else
    ``fastchgnet.data.prototypes.random_structures(n, seed=seed, max_atoms=max_atoms)``.
    Labels: predictions of ``label_model`` (default: the 0.3.0 model on the CPU, untouched by any
    training) plus Gaussian noise (0.02 eV/atom, 0.05 eV/Å, 0.2 GPa, 0.05 μB; magmoms kept >= 0).
    """
    if n_structures < 1:
        raise ValueError(f"n_structures must be >= 1, got {n_structures}")
    rng = np.random.default_rng(seed)
    structures = _cif_structures(n_structures, rng, max_atoms)
    source = "cif"
    if structures is None:
        structures = random_structures(n_structures, seed=seed, max_atoms=max_atoms)
        source = "prototypes"
    model = label_model if label_model is not None else _label_model()
    preds = model.predict(structures, task="efsm", batch_size=16)
    noise = np.random.default_rng(seed + 1_000_003)
    energy = np.array([float(p["e"]) for p in preds]) + noise.normal(0, _NOISE["e"], len(preds))
    forces = [p["f"] + noise.normal(0, _NOISE["f"], p["f"].shape) for p in preds]
    stress = [p["s"] + noise.normal(0, _NOISE["s"], (3, 3)) for p in preds]
    magmom = [np.abs(p["m"] + noise.normal(0, _NOISE["m"], p["m"].shape)) for p in preds]
    return TrainData(structures, energy, forces, stress, magmom, source, seed)
