"""Batching of crystal graphs (paper Alg. 2).

All graphs of a batch are concatenated with index offsets into one set of flat tensors, so that
bond vectors, both radial bases and the angle basis of the whole batch are computed in one pass
by the model. Collation concatenates per-graph arrays (one ``np.concatenate`` per field) and adds
offsets with ``np.repeat``; nothing loops over atoms, bonds or angles.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from fastchgnet.data.graph import CrystalGraph


@dataclass
class Batch:
    """A batch of crystal graphs as flat tensors.

    Bonds are undirected (a directed bond is a bond and a sign); ``bond_vec = pos[bond_src] -
    pos[bond_dst] - bond_image @ lattice[bond_graph]``.
    """

    atomic_numbers: Tensor  # (n_atoms,) int64
    positions: Tensor  # (n_atoms, 3) float, Cartesian Å
    lattice: Tensor  # (n_graphs, 3, 3) float
    atom_graph: Tensor  # (n_atoms,) int64, graph index of each atom
    n_atoms: Tensor  # (n_graphs,) int64
    bond_src: Tensor  # (n_bonds,) int64, global atom index
    bond_dst: Tensor  # (n_bonds,) int64
    bond_image: Tensor  # (n_bonds, 3) float (integer-valued)
    bond_graph: Tensor  # (n_bonds,) int64
    angle_center: Tensor  # (n_angles,) int64
    angle_bond1: Tensor  # (n_angles,) int64, global undirected bond index
    angle_bond2: Tensor  # (n_angles,) int64
    angle_sign: Tensor  # (n_angles,) float, product of the two legs' direction signs
    num_graphs: int
    #: the undirected bonds the angles use, sorted (n_rows,) int64 (at most CHGNet's 3 Å bonds, a
    #: small part of the 6 Å ones), and each angle's legs as positions in it, (n_angles,) int64
    #: each: the bond and angle updates then run on these rows only. None: on every bond
    angle_rows: Tensor | None = None
    angle_row1: Tensor | None = None
    angle_row2: Tensor | None = None

    @property
    def num_atoms(self) -> int:
        return int(self.atomic_numbers.shape[0])

    @property
    def num_bonds(self) -> int:
        return int(self.bond_src.shape[0])

    @property
    def num_angles(self) -> int:
        return int(self.angle_center.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> "Batch":
        """Move to a device; floating tensors (positions, lattice, images, signs) to ``dtype``."""
        return Batch(**fields_to(self, device, dtype, non_blocking))

    def pin_memory(self) -> "Batch":
        return Batch(**{f.name: (getattr(self, f.name).pin_memory()
                                 if isinstance(getattr(self, f.name), Tensor) else getattr(self, f.name))
                        for f in fields(self)})

    @property
    def device(self) -> torch.device:
        return self.positions.device

    @property
    def dtype(self) -> torch.dtype:
        return self.positions.dtype


def fields_to(obj: Any, device: torch.device | str | None, dtype: torch.dtype | None,
              non_blocking: bool = False) -> dict[str, Any]:
    """The fields of a dataclass with every tensor moved to ``device`` and every floating tensor
    cast to ``dtype`` (integer and bool tensors keep their dtype)."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, Tensor):
            cast = dtype if (dtype is not None and v.is_floating_point()) else None
            v = v.to(device=device, dtype=cast, non_blocking=non_blocking)
        out[f.name] = v
    return out


def collate(graphs: Sequence[CrystalGraph], dtype: torch.dtype = torch.float32) -> Batch:
    """Concatenate graphs into one :class:`Batch` with atom and bond index offsets."""
    if len(graphs) == 0:
        raise ValueError("cannot collate an empty list of graphs")
    n_atoms = np.array([g.n_atoms for g in graphs], dtype=np.int64)
    n_bonds = np.array([g.n_bonds for g in graphs], dtype=np.int64)
    n_angles = np.array([g.n_angles for g in graphs], dtype=np.int64)
    atom_off = np.cumsum(n_atoms) - n_atoms
    bond_off = np.cumsum(n_bonds) - n_bonds
    gidx = np.arange(len(graphs), dtype=np.int64)

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(g, name) for g in graphs])

    atom_shift_b = np.repeat(atom_off, n_bonds)
    atom_shift_a = np.repeat(atom_off, n_angles)
    bond_shift_a = np.repeat(bond_off, n_angles)
    sign = cat("angle_sign1").astype(np.int64) * cat("angle_sign2")

    def t(a: np.ndarray, dt: torch.dtype = torch.int64) -> Tensor:
        if a.size == 0:  # numpy may give empty arrays zero strides; compiled graphs guard on them
            return torch.empty(a.shape, dtype=dt)
        return torch.from_numpy(np.ascontiguousarray(a)).to(dt)

    b1 = cat("angle_bond1") + bond_shift_a
    b2 = cat("angle_bond2") + bond_shift_a
    rows, row1, row2 = angle_rows(b1, b2, int(n_bonds.sum()))
    return Batch(
        atomic_numbers=t(cat("atomic_numbers")),
        positions=t(cat("positions"), dtype),
        lattice=t(np.stack([g.lattice for g in graphs]), dtype),
        atom_graph=t(np.repeat(gidx, n_atoms)),
        n_atoms=t(n_atoms),
        bond_src=t(cat("bond_src") + atom_shift_b),
        bond_dst=t(cat("bond_dst") + atom_shift_b),
        bond_image=t(cat("bond_image").reshape(-1, 3), dtype),
        bond_graph=t(np.repeat(gidx, n_bonds)),
        angle_center=t(cat("angle_center") + atom_shift_a),
        angle_bond1=t(b1),
        angle_bond2=t(b2),
        angle_sign=t(sign, dtype),
        num_graphs=len(graphs),
        angle_rows=t(rows),
        angle_row1=t(row1),
        angle_row2=t(row2),
    )


def angle_rows(bond1: np.ndarray, bond2: np.ndarray, n_bonds: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, row1, row2)``: the sorted bonds that ``bond1`` or ``bond2`` (the angles' legs)
    refer to, and the legs renumbered into them (``rows[row1] == bond1``)."""
    used = np.zeros(n_bonds, dtype=bool)
    used[bond1] = True
    used[bond2] = True
    local = np.cumsum(used, dtype=np.int64) - 1
    return np.flatnonzero(used).astype(np.int64), local[bond1], local[bond2]


def split_by_size(
    graphs: Sequence[CrystalGraph],
    *,
    max_graphs: int = 16,
    max_atoms: int | None = None,
    max_bonds: int | None = None,
    max_angles: int | None = None,
) -> list[list[int]]:
    """Group consecutive graph indices into batches bounded by count, atoms, bonds and angles.

    A single graph larger than a bound gets a batch of its own (it cannot be split).
    """
    if max_graphs < 1:
        raise ValueError(f"batch size must be at least 1, got {max_graphs}")
    limits = (max_atoms, max_bonds, max_angles)
    groups: list[list[int]] = []
    cur: list[int] = []
    tot = [0, 0, 0]
    for i, g in enumerate(graphs):
        size = (g.n_atoms, g.n_directed_bonds, g.n_angles)
        over = len(cur) >= max_graphs or any(
            lim is not None and cur and tot[k] + size[k] > lim for k, lim in enumerate(limits)
        )
        if over:
            groups.append(cur)
            cur, tot = [], [0, 0, 0]
        cur.append(i)
        tot = [a + b for a, b in zip(tot, size)]
    if cur:
        groups.append(cur)
    return groups
