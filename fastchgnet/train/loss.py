"""Training loss and metrics for energy, forces, stress and magnetic moments.

Labels of a batch are held in :class:`Targets`: one tensor per target plus boolean masks that say
which labels exist. Energies, forces and stresses are labelled (or not) per structure; magnetic
moments per atom, because a data set may know the moments of some atoms only, or of none.

The loss is a weighted sum of one masked mean per target (paper Eq. 13 style)::

    L = w_e * l(e) + w_f * l(f) + w_s * l(s) + w_m * l(m)

where each ``l`` is the mean of an element-wise Huber (or MSE, or absolute) error over the valid
elements only: structures for energy, force components of labelled structures, the 9 stress
components of labelled structures, and labelled atoms for magnetic moments. A target without any
valid element in the batch contributes exactly zero, with zero (finite) gradient.

Everything in the loss forward and in :meth:`MAEAccumulator.update` stays on the device: masks are
applied with :func:`torch.where`, counts are clamped with ``clamp_min`` and nothing branches on a
tensor value, so a training step never waits for the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastchgnet.data.batch import Batch, fields_to

__all__ = ["DEFAULT_PREFACTORS", "EFSMLoss", "FINETUNE_PREFACTORS", "MAEAccumulator", "Targets", "collate_targets"]

TARGET_KEYS = ("e", "f", "s", "m")
# FastCHGNet / CHGNet training defaults
DEFAULT_PREFACTORS: dict[str, float] = {"e": 2.0, "f": 1.5, "s": 0.1, "m": 0.1}
# the fine-tuning recipe's (a run with ``init``): twice the force weight. Measured on mlearn Si, Ge,
# Li and Mo from 0.3.0 (3 epochs, batch 8, two seeds; benchmarks/results/finetune-loss-study-cpu.json):
# lower test force MAE on all four than with DEFAULT_PREFACTORS, energy MAE still under 0.8x
# chgnet's Trainer where it was (docs/training.md, "Fine-tuning")
FINETUNE_PREFACTORS: dict[str, float] = {"e": 2.0, "f": 3.0, "s": 0.1, "m": 0.1}
LOSS_KINDS = ("huber", "mse", "mae")


@dataclass
class Targets:
    """Labels of one batch as tensors, with masks of the labels that exist.

    * ``e`` (B,) eV/atom, ``e_mask`` (B,) bool;
    * ``f`` (N, 3) eV/Å, ``f_mask`` (B,) bool — per structure;
    * ``s`` (B, 3, 3) GPa, ``s_mask`` (B,) bool;
    * ``m`` (N,) μB, ``m_mask`` (N,) bool — per atom;
    * ``atom_graph`` (N,) int64, the structure of each atom (used to spread ``f_mask`` over atoms;
      :func:`collate_targets` fills it from the batch).

    A value of ``None`` means the target has no labels in this batch at all; a mask of ``None``
    means every label of that target is valid. Missing labels must hold finite placeholders (zeros).
    """

    e: Tensor | None = None
    f: Tensor | None = None
    s: Tensor | None = None
    m: Tensor | None = None
    e_mask: Tensor | None = None
    f_mask: Tensor | None = None
    s_mask: Tensor | None = None
    m_mask: Tensor | None = None
    atom_graph: Tensor | None = None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> "Targets":
        """Move to a device; label values (floating tensors) to ``dtype``. Masks stay bool."""
        return Targets(**fields_to(self, device, dtype, non_blocking))

    def pin_memory(self) -> "Targets":
        """Page-locked copy (DataLoader ``pin_memory=True`` calls this)."""
        return Targets(**{k: (v.pin_memory() if isinstance(v, Tensor) else v)
                          for k, v in vars(self).items()})

    @property
    def device(self) -> torch.device | None:
        for k in TARGET_KEYS:
            v = getattr(self, k)
            if v is not None:
                return v.device
        return None


# ------------------------------------------------------------------------------------------------
# collation of per-structure labels (host side)


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


def collate_targets(
    labels: Sequence[Mapping[str, Any] | None],
    batch: Batch,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Targets:
    """Build :class:`Targets` from one label dict per structure of ``batch``.

    Each dict may hold ``e`` (eV/atom, scalar), ``f`` (n_atoms, 3) eV/Å, ``s`` (3, 3) GPa and
    ``m`` (n_atoms,) μB, as numbers, lists, arrays or tensors. A key that is absent or ``None``
    means that label is missing: it is stored as zeros and masked out. Non-finite values are
    treated as missing too: a NaN energy or stress masks that structure's energy or stress, any
    NaN in a structure's forces masks its forces, and a NaN magnetic moment masks that atom only
    (so partly known moments can be given with NaN for the unknown atoms).

    ``dtype`` defaults to the batch's floating dtype, ``device`` to the batch's device. Collation
    runs on the host (it reads ``batch.n_atoms``); call it before moving the batch to a GPU, or
    pass ``device``.
    """
    n_graphs = batch.num_graphs
    if len(labels) != n_graphs:
        raise ValueError(f"got {len(labels)} label dicts for a batch of {n_graphs} structures")
    n_atoms = [int(n) for n in batch.n_atoms.detach().to("cpu").numpy()]
    if dtype is None:
        dtype = batch.dtype
    if device is None:
        device = batch.device

    e = np.zeros(n_graphs)
    e_mask = np.zeros(n_graphs, dtype=bool)
    s = np.zeros((n_graphs, 3, 3))
    s_mask = np.zeros(n_graphs, dtype=bool)
    f_mask = np.zeros(n_graphs, dtype=bool)
    f_parts: list[np.ndarray] = []
    m_parts: list[np.ndarray] = []
    m_mask_parts: list[np.ndarray] = []

    for i, (lab, n) in enumerate(zip(labels, n_atoms)):
        lab = {} if lab is None else lab
        unknown = set(lab) - set(TARGET_KEYS)
        if unknown:
            raise ValueError(f"structure {i}: unknown label keys {sorted(unknown)}; "
                             f"use {list(TARGET_KEYS)}")
        # energy per atom
        v = lab.get("e")
        if v is not None:
            a = _as_array(v)
            if a.size != 1:
                raise ValueError(f"structure {i}: energy label must be a scalar, got shape {a.shape}")
            val = float(a.reshape(()))
            if math.isfinite(val):
                e[i], e_mask[i] = val, True
        # forces
        v = lab.get("f")
        fi = np.zeros((n, 3))
        if v is not None:
            a = _as_array(v)
            if a.shape != (n, 3):
                raise ValueError(f"structure {i}: forces must have shape ({n}, 3), got {a.shape}")
            if np.isfinite(a).all():
                fi, f_mask[i] = a, True
        f_parts.append(fi)
        # stress
        v = lab.get("s")
        if v is not None:
            a = _as_array(v)
            if a.size != 9:
                raise ValueError(f"structure {i}: stress must be 3x3, got shape {a.shape}")
            a = a.reshape(3, 3)
            if np.isfinite(a).all():
                s[i], s_mask[i] = a, True
        # magnetic moments (per atom)
        v = lab.get("m")
        mi, mm = np.zeros(n), np.zeros(n, dtype=bool)
        if v is not None:
            a = _as_array(v).reshape(-1)
            if a.shape != (n,):
                raise ValueError(f"structure {i}: magmoms must have shape ({n},), got {a.shape}")
            mm = np.isfinite(a)
            mi = np.where(mm, a, 0.0)
        m_parts.append(mi)
        m_mask_parts.append(mm)

    def t(a: np.ndarray, dt: torch.dtype) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dt)

    return Targets(
        e=t(e, dtype),
        f=t(np.concatenate(f_parts).reshape(-1, 3), dtype),
        s=t(s, dtype),
        m=t(np.concatenate(m_parts), dtype),
        e_mask=t(e_mask, torch.bool),
        f_mask=t(f_mask, torch.bool),
        s_mask=t(s_mask, torch.bool),
        m_mask=t(np.concatenate(m_mask_parts), torch.bool),
        atom_graph=batch.atom_graph.to(device),
    )


# ------------------------------------------------------------------------------------------------
# masked per-target terms (device side, no host sync)


def _atom_graph(targets: Targets, batch: Batch | None) -> Tensor | None:
    if targets.atom_graph is not None:
        return targets.atom_graph
    return batch.atom_graph if batch is not None else None


def _terms(pred: Mapping[str, Tensor], targets: Targets,
           batch: Batch | None) -> Iterator[tuple[str, Tensor, Tensor, Tensor]]:
    """``(key, prediction, label, element mask)`` of each target present in both, the label and
    the mask broadcast to the prediction's shape; masked-out labels replaced by the (detached)
    prediction so that their element error and its gradient are exactly zero (and NaN-free)."""
    for key in TARGET_KEYS:
        p = pred.get(key)
        y = getattr(targets, key)
        if p is None or y is None:
            continue
        if y.shape != p.shape:
            raise ValueError(f"target {key!r}: label shape {tuple(y.shape)} does not match the "
                             f"prediction's {tuple(p.shape)}")
        mask = getattr(targets, f"{key}_mask")
        if mask is None:
            mask = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
        elif key == "f":
            ag = _atom_graph(targets, batch)
            if ag is None:
                raise ValueError("per-structure force mask needs Targets.atom_graph (or a batch)")
            mask = mask.index_select(0, ag)  # (N,) per atom
        if mask.shape[0] != p.shape[0]:
            raise ValueError(f"target {key!r}: mask length {mask.shape[0]} does not match "
                             f"{p.shape[0]} predictions")
        mask = mask.reshape(mask.shape[0], *([1] * (p.dim() - 1))).expand_as(p)
        y = y.to(dtype=p.dtype)
        y = torch.where(mask, y, p.detach())
        yield key, p, y, mask


def _masked_mean(err: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``err`` over ``mask``; exactly 0 when nothing is valid (no host sync)."""
    total = torch.where(mask, err, torch.zeros_like(err)).sum()
    count = mask.sum().clamp_min(1).to(err.dtype)
    return total / count


class EFSMLoss(nn.Module):
    """Weighted masked loss on energy per atom, forces, stress and magnetic moments.

    Args:
        e, f, s, m: prefactors (defaults 2.0, 1.5, 0.1, 0.1, as FastCHGNet / CHGNet).
        delta: the Huber loss threshold (default 0.1, in each target's unit).
        loss: ``"huber"`` (default), ``"mse"`` or ``"mae"``.

    ``forward(pred, targets, batch=None)`` returns ``(total, parts)``: the scalar weighted sum
    and a dict of the unweighted per-target losses (keys ``e``, ``f``, ``s``, ``m`` of the
    targets present in both ``pred`` and ``targets``; e.g. task ``"ef"`` gives ``e`` and ``f``).
    Force and stress losses are means over components; a target with no valid label in the batch
    is exactly 0. ``batch`` is only needed when ``targets.atom_graph`` is not set.
    """

    def __init__(self, e: float = DEFAULT_PREFACTORS["e"], f: float = DEFAULT_PREFACTORS["f"],
                 s: float = DEFAULT_PREFACTORS["s"], m: float = DEFAULT_PREFACTORS["m"], *,
                 delta: float = 0.1, loss: str = "huber") -> None:
        super().__init__()
        if loss not in LOSS_KINDS:
            raise ValueError(f"unknown loss {loss!r}; use one of {LOSS_KINDS}")
        if not delta > 0:
            raise ValueError(f"Huber delta must be positive, got {delta}")
        self.prefactors = {"e": float(e), "f": float(f), "s": float(s), "m": float(m)}
        for k, w in self.prefactors.items():
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"prefactor {k!r} must be finite and non-negative, got {w}")
        self.delta = float(delta)
        self.loss = loss

    def extra_repr(self) -> str:
        w = ", ".join(f"{k}={v:g}" for k, v in self.prefactors.items())
        return f"{w}, loss={self.loss!r}, delta={self.delta:g}"

    def elementwise(self, p: Tensor, y: Tensor) -> Tensor:
        if self.loss == "huber":
            return F.huber_loss(p, y, reduction="none", delta=self.delta)
        if self.loss == "mse":
            return F.mse_loss(p, y, reduction="none")
        return F.l1_loss(p, y, reduction="none")

    def forward(self, pred: Mapping[str, Tensor], targets: Targets,
                batch: Batch | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        parts: dict[str, Tensor] = {}
        total: Tensor | None = None
        for key, p, y, mask in _terms(pred, targets, batch):
            part = _masked_mean(self.elementwise(p, y), mask)
            parts[key] = part
            weighted = part * self.prefactors[key]
            total = weighted if total is None else total + weighted
        if total is None:
            ref = next((v for v in pred.values() if isinstance(v, Tensor)), None)
            total = (torch.zeros((), device=ref.device, dtype=ref.dtype) if ref is not None
                     else torch.zeros(()))
        return total, parts


# ------------------------------------------------------------------------------------------------
# metrics


class MAEAccumulator:
    """Mean absolute errors over many batches, accumulated on the device.

    ``update(pred, targets)`` adds the masked absolute-error sums and label counts of a batch to
    device tensors (no host sync); ``compute()`` copies them to the host once and returns
    ``{"e_mae": eV/atom, "f_mae": eV/Å, "s_mae": GPa, "m_mae": μB}`` — force and stress errors are
    per component — with NaN for a target that had no label. ``reset()`` starts over.
    """

    def __init__(self) -> None:
        self._sums: Tensor | None = None  # (4,) absolute-error sums, in TARGET_KEYS order
        self._counts: Tensor | None = None  # (4,) int64 numbers of labelled elements

    def reset(self) -> None:
        self._sums = None
        self._counts = None

    @torch.no_grad()
    def update(self, pred: Mapping[str, Tensor], targets: Targets,
               batch: Batch | None = None) -> None:
        for key, p, y, mask in _terms(pred, targets, batch):
            if self._sums is None:
                acc = torch.float32 if p.device.type == "mps" else torch.float64
                self._sums = torch.zeros(len(TARGET_KEYS), dtype=acc, device=p.device)
                self._counts = torch.zeros(len(TARGET_KEYS), dtype=torch.int64, device=p.device)
            assert self._counts is not None
            i = TARGET_KEYS.index(key)
            err = (p.detach() - y).abs().to(self._sums.dtype)
            self._sums[i] += torch.where(mask, err, torch.zeros_like(err)).sum()
            self._counts[i] += mask.sum()

    def compute(self) -> dict[str, float]:
        out = {f"{k}_mae": float("nan") for k in TARGET_KEYS}
        if self._sums is None or self._counts is None:
            return out
        sums = self._sums.to("cpu").tolist()  # the one host transfer
        counts = self._counts.to("cpu").tolist()
        for k, total, n in zip(TARGET_KEYS, sums, counts):
            if n > 0:
                out[f"{k}_mae"] = total / n
        return out
