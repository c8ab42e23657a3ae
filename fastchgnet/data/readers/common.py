"""What every reader shares: :class:`Sample`, :class:`BadEntry`, the skip statistics, and the label
checks (:func:`make_sample`, :func:`check_structure`) that all unit conversions end in."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from fastchgnet.data.graph import MAX_ATOMIC_NUMBER, structure_arrays
from fastchgnet.units import EV_A3_TO_GPA, KBAR_TO_GPA

log = logging.getLogger("fastchgnet.data.readers")

# mlearn ``virial_stress``: positions 3, 4, 5 are (xy, yz, zx), VASP's OUTCAR order
MLEARN_VOIGT_PAIRS: tuple[tuple[int, int], ...] = ((0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (2, 0))
# ASE Voigt order: xx, yy, zz, yz, xz, xy
ASE_VOIGT_PAIRS: tuple[tuple[int, int], ...] = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))

STRESS_UNITS = {"eV/A3": EV_A3_TO_GPA, "GPa": 1.0, "kBar": KBAR_TO_GPA}
STRESS_SIGNS = {"ase": 1.0, "chgnet": 1.0, "vasp": -1.0}


@dataclass
class Sample:
    """One labelled structure. A label that is ``None`` is missing (masked in the loss)."""

    structure: Any  # pymatgen Structure
    energy_per_atom: float  # eV/atom
    forces: np.ndarray | None = None  # (n_atoms, 3) eV/Å
    stress: np.ndarray | None = None  # (3, 3) GPa, positive = tensile (CHGNet and ASE sign)
    magmom: np.ndarray | None = None  # (n_atoms,) μB, magnitudes
    id: str = ""  # "<file name>:<entry id>", unique within a file
    source: str = ""  # path of the file it came from
    info: dict = field(default_factory=dict)  # metadata (mp_id, frame_id, mlearn group, ...)

    @property
    def n_atoms(self) -> int:
        return len(self.structure)


# ------------------------------------------------------------------------------------------------
# bad entries and statistics


class BadEntry(ValueError):
    """A malformed entry; ``reason`` is a short category used in the skip statistics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _stats_init(stats: dict | None) -> None:
    if stats is None:
        return
    stats.setdefault("read", 0)
    stats.setdefault("skipped", 0)
    stats.setdefault("reasons", {})
    stats.setdefault("examples", {})
    missing = stats.setdefault("missing", {})
    for k in ("forces", "stress", "magmom"):
        missing.setdefault(k, 0)


def _stats_read(stats: dict | None, sample: Sample) -> None:
    if stats is None:
        return
    stats["read"] += 1
    for k in ("forces", "stress", "magmom"):
        if getattr(sample, k) is None:
            stats["missing"][k] += 1


def _stats_skip(stats: dict | None, exc: BadEntry) -> None:
    log.debug("skipped: %s", exc)
    if stats is None:
        return
    stats["skipped"] += 1
    stats["reasons"][exc.reason] = stats["reasons"].get(exc.reason, 0) + 1
    stats["examples"].setdefault(exc.reason, str(exc))


def _guarded(
    source: str,
    entries: Iterable[tuple[str, Callable[[], Sample]]],
    skip_bad: bool,
    stats: dict | None,
) -> Iterator[Sample]:
    """Build each entry's sample; name file and entry in errors; skip and count when asked."""
    _stats_init(stats)
    for entry_id, build in entries:
        try:
            sample = build()
        except BadEntry as exc:
            err = BadEntry(exc.reason, f"{source}: entry {entry_id}: {exc}")
            if not skip_bad:
                raise err from None
            _stats_skip(stats, err)
            continue
        _stats_read(stats, sample)
        yield sample


# ------------------------------------------------------------------------------------------------
# label validation (all conversions end here)


def _floats(value: Any, what: str) -> np.ndarray:
    if isinstance(value, (str, bytes, dict)):
        raise BadEntry("bad value", f"{what} is not numeric ({type(value).__name__})")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise BadEntry("bad value", f"{what} is not an array of numbers") from None
    return arr


def _finite(arr: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise BadEntry("non-finite", f"{what} contains NaN or inf")
    return arr


def _is_missing(value: Any) -> bool:
    # None is missing; so is an empty list (MPtrj writes [] for some absent stresses)
    return value is None or (isinstance(value, (list, tuple)) and len(value) == 0)


def check_atoms(z: np.ndarray, pos: np.ndarray, lat: np.ndarray) -> int:
    """Check atomic numbers (some, all within 1..94) and finite coordinates and lattice; return
    the number of atoms. Raises :class:`BadEntry` naming the problem."""
    n = int(z.shape[0])
    if n == 0:
        raise BadEntry("empty structure", "structure is empty (no atoms)")
    bad = (z < 1) | (z > MAX_ATOMIC_NUMBER)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise BadEntry("unknown element", f"structure has atomic number {int(z[i])} at site {i}; "
                       f"the model covers Z = 1..{MAX_ATOMIC_NUMBER}")
    if not (np.isfinite(pos).all() and np.isfinite(lat).all()):
        raise BadEntry("non-finite", "structure has a NaN or inf coordinate or lattice vector")
    return n


def check_structure(structure: Any) -> int:
    """Check what the readers guarantee about a structure; return its number of atoms.

    Raises :class:`BadEntry` (a ValueError) for an empty, disordered or non-element structure, an
    atomic number outside 1..94, non-finite coordinates or lattice, or a singular lattice. Graph
    rules (minimum distance, isolated atoms) are checked later, by ``build_graph``.
    """
    try:
        z, pos, lat, _ = structure_arrays(structure)
    except (ValueError, TypeError) as exc:
        raise BadEntry("bad structure", f"structure {exc}") from None
    n = check_atoms(z, pos, lat)
    vol = abs(float(np.linalg.det(lat)))
    if not vol > 1e-6:
        raise BadEntry("bad structure", f"structure has a singular lattice (volume {vol:.3g} Å^3)")
    return n


def _stress33(value: Any, what: str, voigt_pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """A (3, 3) array from a 3×3 / 9-vector, or a 6-vector in the given Voigt order."""
    arr = _floats(value, what)
    if arr.shape in ((3, 3), (9,)):
        return arr.reshape(3, 3)
    if arr.shape == (6,):
        out = np.empty((3, 3))
        for v, (i, j) in zip(arr, voigt_pairs):
            out[i, j] = out[j, i] = v
        return out
    raise BadEntry("bad shape", f"{what} has shape {arr.shape}, expected (3, 3), (9,) or (6,)")


def make_sample(
    structure: Any,
    *,
    energy_per_atom: Any = None,
    energy_total: Any = None,
    forces: Any = None,
    stress_gpa: Any = None,
    magmom: Any = None,
    id: str = "",
    source: str = "",
    info: dict | None = None,
) -> Sample:
    """Validate labels (already in fastchgnet units and signs) and build a :class:`Sample`.

    Exactly one of ``energy_per_atom`` (eV/atom) and ``energy_total`` (eV) is used; the per-atom
    one wins when both are given. ``stress_gpa`` is (3, 3), positive = tensile. Magnetic moments
    are stored as magnitudes. Raises :class:`BadEntry` for a bad structure or label.
    """
    n = check_structure(structure)
    if energy_per_atom is not None:
        e = _floats(energy_per_atom, "energy_per_atom")
    elif energy_total is not None:
        e = _floats(energy_total, "energy") / n
    else:
        raise BadEntry("missing key", "no energy label")
    if e.shape not in ((), (1,)):
        raise BadEntry("bad shape", f"energy has shape {e.shape}, expected a scalar")
    e_val = float(_finite(e, "energy").reshape(()))

    f = None
    if not _is_missing(forces):
        f = _floats(forces, "forces")
        if f.shape != (n, 3):
            raise BadEntry("bad shape", f"forces has shape {f.shape}, expected ({n}, 3)")
        _finite(f, "forces")
    s = None
    if not _is_missing(stress_gpa):
        s = _floats(stress_gpa, "stress")
        if s.shape != (3, 3):
            raise BadEntry("bad shape", f"stress has shape {s.shape}, expected (3, 3)")
        _finite(s, "stress")
    m = None
    if not _is_missing(magmom):
        m = _floats(magmom, "magmom")
        if m.shape != (n,):
            raise BadEntry("bad shape", f"magmom has shape {m.shape}, expected ({n},)")
        m = np.abs(_finite(m, "magmom"))
    return Sample(structure=structure, energy_per_atom=e_val, forces=f, stress=s, magmom=m,
                  id=id, source=source, info=dict(info or {}))


def _structure_from_dict(d: Any) -> Any:
    from pymatgen.core import Structure

    if not isinstance(d, dict):
        raise BadEntry("bad structure", f"structure is a {type(d).__name__}, expected a dict")
    if isinstance(d.get("sites"), list) and not d["sites"]:
        raise BadEntry("empty structure", "structure is empty (no atoms)")
    try:
        return Structure.from_dict(d)
    except Exception as exc:  # pymatgen raises KeyError, ValueError, TypeError, ... on bad dicts
        raise BadEntry("bad structure", f"structure cannot be read: {type(exc).__name__}: {exc}") from None


def _require(d: dict, key: str) -> Any:
    if key not in d:
        raise BadEntry("missing key", f"missing key {key!r}")
    return d[key]


def _suffix(path: str | os.PathLike) -> str:
    """The file's extension, lower case, ignoring a final ``.gz``."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return Path(name).suffix


__all__ = ["ASE_VOIGT_PAIRS", "BadEntry", "MLEARN_VOIGT_PAIRS", "STRESS_SIGNS", "STRESS_UNITS", "Sample",
           "check_structure", "make_sample"]
