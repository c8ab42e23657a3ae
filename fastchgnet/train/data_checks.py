"""Checks of the training data, logged when a run starts (see docs/training.md, "What happens when
things go wrong").

* **Labels.** How many training frames carry each label (energy, forces, stress, magnetic
  moments). A label missing from *every* frame while its loss weight is nonzero is a loud
  warning: a misspelled key in the dataset, or labels that were never written.
* **Stress units.** The stress labels are GPa in the cache (the readers convert). The statistic is
  the median, over the labelled training frames, of the largest absolute stress component.
  Above :data:`STRESS_HIGH_GPA` (50 GPa) the labels are implausible for GPa: real DFT sets lie far
  below (the mlearn sets: 0.6 to 16 GPa), while a unit mix-up multiplies them by 10 (kBar read
  as GPa), 160 (GPa read as eV/Å³) or 1600 (kBar read as eV/Å³). Below
  :data:`STRESS_LOW_GPA` (0.001 GPa = 0.01 kBar, under VASP's printed precision) they are
  implausibly small or all zero (eV/Å³ read as GPa; placeholder zeros). A factor of 10 too
  *small* (GPa read as kBar) cannot be told from a set of nearly relaxed structures, so it is
  not flagged.
* **Train/test overlap.** Frames that appear in both the training set and the test (or
  validation) set: same atomic numbers, positions and lattice rounded to 1e-4 Å. They make the
  test MAEs optimistic.

The arrays are read from the graph cache's shards (the layout documented in
:mod:`fastchgnet.data.cache`), memory-mapped, only for the samples of each set.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from fastchgnet.data.cache import GraphCache
from fastchgnet.train.data import GraphDataset

__all__ = ["STRESS_HIGH_GPA", "STRESS_LOW_GPA", "check_training_data", "frame_hashes",
           "label_counts", "stress_scale", "stress_unit_warning"]

STRESS_HIGH_GPA = 50.0
STRESS_LOW_GPA = 1e-3
LABELS = {"e": "energy", "f": "forces", "s": "stress", "m": "magmom"}
_DECIMALS = 4  # positions and lattice rounded to 1e-4 Å for the overlap check


def _shard_groups(ds: GraphDataset) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(shard, positions in ds, local indices in the shard)`` for the samples of ``ds``."""
    cache: GraphCache = ds.cache
    starts = np.concatenate([[0], np.cumsum(cache.shard_sizes)]).astype(np.int64)
    idx = np.asarray(ds.indices, dtype=np.int64)
    shard = np.searchsorted(starts, idx, side="right") - 1
    for k in np.unique(shard):
        where = np.nonzero(shard == k)[0]
        yield int(k), where, idx[where] - starts[k]


def _load(ds: GraphDataset, k: int, name: str) -> np.ndarray:
    return np.load(ds.cache.path / f"shard-{k:05d}" / f"{name}.npy", mmap_mode="r")


def label_counts(ds: GraphDataset) -> dict[str, int]:
    """Number of frames of ``ds`` that carry each label (``e``, ``f``, ``s``, ``m``)."""
    has = np.zeros((len(ds), 4), dtype=bool)
    for k, where, local in _shard_groups(ds):
        has[where] = np.asarray(_load(ds, k, "has"))[local]
    return {key: int(has[:, i].sum()) for i, key in enumerate(LABELS)}


def stress_labels(ds: GraphDataset) -> np.ndarray:
    """(n_labelled, 3, 3) stress labels (GPa) of the frames of ``ds`` that have one."""
    out = []
    for k, _, local in _shard_groups(ds):
        has = np.asarray(_load(ds, k, "has"))[local, 2]
        out.append(np.asarray(_load(ds, k, "stress"))[local[has]].astype(np.float64))
    return np.concatenate(out) if out else np.zeros((0, 3, 3))


def stress_scale(stress: np.ndarray) -> float | None:
    """Median over frames of the largest absolute stress component (GPa); None without labels."""
    s = np.abs(np.asarray(stress, dtype=np.float64)).reshape(len(stress), -1)
    return float(np.median(s.max(axis=1))) if len(s) else None


def stress_unit_warning(scale: float | None) -> str | None:
    """The warning for a stress scale (see :func:`stress_scale`) outside the plausible range."""
    if scale is None:
        return None
    if scale > STRESS_HIGH_GPA:
        return (f"WARNING: the stress labels look too large for GPa: the median over the training "
                f"frames of the largest |stress component| is {scale:.4g} GPa (above "
                f"{STRESS_HIGH_GPA:g} GPa; DFT training sets lie far below, the mlearn sets at "
                "0.6 to 16 GPa). A unit mix-up? Labels in kBar read as GPa are 10x too large, in "
                "GPa read as eV/A^3 160x, in kBar read as eV/A^3 1600x. Check the stress unit the "
                "reader assumed (docs/data_formats.md).")
    if scale < STRESS_LOW_GPA:
        return (f"WARNING: the stress labels look too small: the median over the training frames "
                f"of the largest |stress component| is {scale:.3g} GPa (below {STRESS_LOW_GPA:g} "
                "GPa = 0.01 kBar). All zero, or a unit mix-up (eV/A^3 read as GPa is 160x too "
                "small)? Check the stress unit the reader assumed (docs/data_formats.md).")
    return None


def frame_hashes(ds: GraphDataset) -> list[bytes]:
    """One hash per frame of ``ds``: atomic numbers, positions and lattice rounded to 1e-4 Å."""
    out: list[bytes] = [b""] * len(ds)
    for k, where, local in _shard_groups(ds):
        # the whole shard at once (+ 0.0 turns a rounded -0.0 into 0.0), then one hash per frame
        z = np.asarray(_load(ds, k, "atomic_numbers"), dtype=np.int64)
        pos = np.round(np.asarray(_load(ds, k, "positions"), dtype=np.float64), _DECIMALS) + 0.0
        lat = np.round(np.asarray(_load(ds, k, "lattice"), dtype=np.float64), _DECIMALS) + 0.0
        ptr = np.asarray(_load(ds, k, "atom_ptr")).tolist()
        zb, pb, lb = z.tobytes(), pos.tobytes(), lat.tobytes()  # 8, 24, 72 bytes per row
        for pos_in_ds, i in zip(where.tolist(), local.tolist()):
            a0, a1 = ptr[i], ptr[i + 1]
            h = hashlib.blake2b(zb[8 * a0:8 * a1], digest_size=16)
            h.update(pb[24 * a0:24 * a1])
            h.update(lb[72 * i:72 * i + 72])
            out[pos_in_ds] = h.digest()
    return out


def _shared(train: set[bytes], other: GraphDataset) -> int:
    return sum(h in train for h in frame_hashes(other))


def check_training_data(train_set: GraphDataset, val_set: GraphDataset, test_set: GraphDataset,
                        weights: Mapping[str, float], log: Callable[[str], None]) -> dict[str, Any]:
    """Log the label counts, the stress-unit check and the train/test overlap; return them.
    ``weights``: the largest loss prefactor of each label over the run's stages."""
    n = len(train_set)
    counts = label_counts(train_set)
    log(f"labels of the {n} training frames: "
        + ", ".join(f"{LABELS[k]} {counts[k]}" for k in LABELS)
        + " (a frame without a label is masked out of that loss term)")
    for k, name in LABELS.items():
        if counts[k] == 0 and n and weights.get(k, 0.0) > 0:
            hint = ("normal for data without magnetic moments; --weights E,F,S,0 silences this"
                    if k == "m" else "a misspelled or missing key in the dataset? See "
                    "docs/data_formats.md for the keys each reader looks for")
            log(f"WARNING: no training frame has a {name} label, but its loss weight is "
                f"{weights[k]:g}: that loss term trains nothing ({hint}).")
        elif 0 < n - counts[k] and counts[k] and k != "m":
            log(f"note: {n - counts[k]} of the {n} training frames have no {name} label")
    scale = stress_scale(stress_labels(train_set)) if counts["s"] else None
    warning = stress_unit_warning(scale)
    if warning:
        log(warning)
    shared = {"test": 0, "val": 0}
    if len(test_set) or len(val_set):
        seen = set(frame_hashes(train_set))
        shared = {"test": _shared(seen, test_set), "val": _shared(seen, val_set)}
    if shared["test"] or shared["val"]:
        log(f"WARNING: {shared['test']} of the {len(test_set)} test frames and {shared['val']} of "
            f"the {len(val_set)} validation frames also appear in the training set (same atoms, "
            "positions and lattice to 1e-4 A): the test and validation MAEs are optimistic. "
            "Remove the duplicates from the dataset, or give separate --val-data/--test-data.")
    return {"labels": counts, "n_train": n, "stress_scale_gpa": scale,
            "shared_with_train": shared}
