"""Dataset readers: labelled structures from MPtrj JSON, extxyz, ASE databases and mlearn JSON.

Every reader yields :class:`Sample` objects lazily, with labels already converted to fastchgnet's
units and signs (those of the model's outputs). A label that is ``None`` is *missing*: the loss
masks it. The user documentation is ``docs/data_formats.md``.

Units
-----

What each :class:`Sample` field holds, and how each format's numbers are converted to it
(n = number of atoms):

================  ========================================  ======================================
Sample field      format: stored as                         conversion
================  ========================================  ======================================
energy_per_atom   (all) eV/atom, finite, required
                  MPtrj ``energy_per_atom`` (eV/atom)       as is
                  MPtrj ``corrected_total_energy`` (eV)     ÷ n (only without ``energy_per_atom``)
                  mlearn ``outputs.energy`` (eV)            ÷ n
                  ASE energy (eV, total)                    ÷ n
forces (n, 3)     (all) eV/Å                                as is
stress (3, 3)     (all) GPa, positive = tensile             CHGNet's (and ASE's) sign
                  MPtrj ``stress``: 3×3 kBar, VASP sign     × −0.1
                  mlearn ``virial_stress``: 6 kBar, VASP    × −0.1; order xx, yy, zz, xy, yz, zx
                  ASE: eV/Å³, ASE sign (the default)        × 160.21766208; Voigt order xx, yy,
                                                            zz, yz, xz, xy (or 9 values, or 3×3)
                  ASE, ``stress_unit="kBar"`` / ``"GPa"``   × 0.1 / × 1
                  ASE, ``stress_sign="vasp"``               × −1 more
magmom (n,)       (all) μB, magnitudes                      absolute value (the model predicts |m|,
                  MPtrj ``magmom``, ASE ``magmoms``         and CHGNet trains on |m|)
================  ========================================  ======================================

1 eV/Å³ = 160.21766208 GPa (the constant CHGNet uses); 1 kBar = 0.1 GPa. VASP (and so MPtrj and
mlearn) reports the stress with the opposite sign to ASE and CHGNet, hence the −0.1.

The mlearn off-diagonal order was determined on the Si test set: in the "Elastic" frames with a
sheared cell, the single non-zero off-diagonal component sits at Voigt position 3 when the cell's b
vector is tilted along x (an xy shear), at position 4 for a yz shear and at position 5 for an xz
shear. CHGNet 0.3.0's predicted off-diagonal stresses on those frames correlate with the labels
with r = 1.00 in that order, and with r = −0.20 in the (yz, xz, xy) order ASE uses.

Bad entries
-----------

An entry that cannot give a correct sample raises ``ValueError`` naming the file and the entry, e.g.
``data.json: entry mp-123/frame-7: forces has shape (5, 3), expected (4, 3)``. With
``skip_bad=True`` it is skipped and counted in ``stats`` instead; another sample is never
substituted. Errors in the file itself (invalid JSON, a truncated file) always raise.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np

from fastchgnet.data.graph import MAX_ATOMIC_NUMBER, structure_arrays

log = logging.getLogger(__name__)

EV_PER_A3_TO_GPA = 160.21766208  # 1 eV/Å^3 in GPa (CODATA 2014 e; the value CHGNet uses)
KBAR_TO_GPA = 0.1
# VASP / MPtrj / mlearn stress: kBar, positive = compressive -> GPa, positive = tensile
VASP_KBAR_TO_GPA = -KBAR_TO_GPA
DEFAULT_CHUNK_SIZE = 1 << 20  # characters read per step by the streaming JSON reader
# Largest single top-level JSON value (one MPtrj mp_id) the streaming reader will buffer. An
# unterminated string in a corrupt file would otherwise make it read the whole file.
MAX_ENTRY_CHARS = 1 << 31

# mlearn ``virial_stress``: positions 3, 4, 5 are (xy, yz, zx), VASP's OUTCAR order
MLEARN_VOIGT_PAIRS: tuple[tuple[int, int], ...] = ((0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (2, 0))
# ASE Voigt order: xx, yy, zz, yz, xz, xy
ASE_VOIGT_PAIRS: tuple[tuple[int, int], ...] = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))

STRESS_UNITS = {"eV/A3": EV_PER_A3_TO_GPA, "GPa": 1.0, "kBar": KBAR_TO_GPA}
STRESS_SIGNS = {"ase": 1.0, "chgnet": 1.0, "vasp": -1.0}

Format = Literal["auto", "mptrj", "extxyz", "asedb", "ase", "mlearn"]


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


# ------------------------------------------------------------------------------------------------
# streaming JSON


def _open_text(path: str | os.PathLike) -> io.TextIOBase:
    """Open a (possibly gzip-compressed) UTF-8 text file."""
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


_WS = re.compile(r"[ \t\n\r]*")


def _maybe_truncated(exc: json.JSONDecodeError, buf_len: int) -> bool:
    """Could more input fix this decode error? (If not, the JSON is invalid.)

    With input cut short, the C scanner stops within a few characters of the end, except for a
    string cut in two, which it reports at the string's start.
    """
    return exc.pos >= buf_len - 32 or exc.msg.startswith("Unterminated string")


def iter_json_top_level(
    fh: io.TextIOBase, *, source: str = "<json>", chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[tuple[str | int, Any]]:
    """Stream the members of a top-level JSON object or array, one at a time.

    Yields ``(key, value)`` for an object, ``(index, value)`` for an array. Reads ``chunk_size``
    characters at a time into a buffer and decodes each member with
    :meth:`json.JSONDecoder.raw_decode` once it is complete, so memory stays bounded by one member
    (plus a chunk). When a member is larger than the buffer, the next read is at least as large as
    the buffered part (the buffer doubles), so a large member is decoded O(1) times on average.
    Raises ValueError naming ``source`` for invalid or truncated JSON.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    decoder = json.JSONDecoder()
    buf = ""
    pos = 0
    dropped = 0  # characters discarded from the front of the buffer
    eof = False

    def fill(at_least: int = 0) -> None:
        nonlocal buf, pos, dropped, eof
        if pos:
            dropped += pos
            buf = buf[pos:]
            pos = 0
        need = max(chunk_size, at_least)
        while need > 0 and not eof:
            piece = fh.read(need)
            if not piece:
                eof = True
                break
            buf += piece
            need -= len(piece)

    def skip_ws() -> str | None:
        """Advance past whitespace; return the next character, None at end of file."""
        nonlocal pos
        while True:
            pos = _WS.match(buf, pos).end()
            if pos < len(buf):
                return buf[pos]
            if eof:
                return None
            fill()

    def invalid(msg: str, at: int) -> ValueError:
        return ValueError(f"{source}: invalid JSON at character {dropped + at}: {msg}")

    def decode() -> Any:
        nonlocal pos
        while True:
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                if eof:
                    raise ValueError(f"{source}: invalid or truncated JSON at character "
                                     f"{dropped + exc.pos}: {exc.msg}") from None
                if not _maybe_truncated(exc, len(buf)):
                    raise invalid(exc.msg, exc.pos) from None
                pending = len(buf) - pos
                if pending > MAX_ENTRY_CHARS:
                    raise ValueError(f"{source}: a top-level entry at character {dropped + pos} is "
                                     f"longer than {MAX_ENTRY_CHARS} characters (or the JSON is "
                                     f"invalid)") from None
                fill(pending)
                continue
            if end == len(buf) and not eof and not isinstance(value, (dict, list, str)):
                fill()  # a number may continue in the next chunk
                continue
            pos = end
            return value

    c = skip_ws()
    if c == "\ufeff":  # byte-order mark
        pos += 1
        c = skip_ws()
    if c not in ("{", "["):
        found = "end of file" if c is None else repr(c)
        raise ValueError(f"{source}: expected a JSON object or list at the top level, found {found}")
    is_obj = c == "{"
    close = "}" if is_obj else "]"
    pos += 1
    index = 0
    while True:
        c = skip_ws()
        if c is None:
            raise ValueError(f"{source}: truncated JSON (end of file inside the top-level "
                             f"{'object' if is_obj else 'list'})")
        if c == close and index == 0:
            pos += 1
            break
        if index > 0:
            if c == close:
                pos += 1
                break
            if c != ",":
                raise invalid(f"expected ',' or {close!r}, found {c!r}", pos)
            pos += 1
            skip_ws()
        if is_obj:
            if skip_ws() != '"':
                raise invalid("expected a string key", pos)
            key = decode()
            if skip_ws() != ":":
                raise invalid("expected ':'", pos)
            pos += 1
            skip_ws()
        else:
            key = index
        value = decode()
        yield key, value
        del value
        index += 1
    if skip_ws() is not None:
        raise invalid("unexpected data after the top-level value", pos)


def _peek_json_kind(path: str | os.PathLike) -> str:
    """'mptrj' for an object of objects, 'mlearn' for a list; decodes at most one member."""
    with _open_text(path) as fh:
        it = iter_json_top_level(fh, source=str(path))
        try:
            _, first = next(it)
        except StopIteration:
            first = None
        except ValueError:
            first = None
        fh.seek(0)
        head = fh.read(4096).lstrip("\ufeff \t\r\n")
    if head.startswith("["):
        return "mlearn"
    if head.startswith("{") and isinstance(first, dict):
        return "mptrj"
    raise ValueError(f"{path}: cannot tell the dataset format from the JSON (expected an object "
                     f"of MPtrj entries or an mlearn list); pass format=")


# ------------------------------------------------------------------------------------------------
# MPtrj


def _mptrj_sample(frame: Any, mp_id: str, frame_id: str, name: str, source: str) -> Sample:
    if not isinstance(frame, dict):
        raise BadEntry("bad value", f"frame is a {type(frame).__name__}, expected a dict")
    structure = _structure_from_dict(_require(frame, "structure"))
    e_pa = frame.get("energy_per_atom")
    e_tot = frame.get("corrected_total_energy")
    if e_pa is None and e_tot is None:
        raise BadEntry("missing key", "missing key 'energy_per_atom' (and no 'corrected_total_energy')")
    stress = frame.get("stress")
    if not _is_missing(stress):
        s = _floats(stress, "stress")
        if s.shape != (3, 3):
            raise BadEntry("bad shape", f"stress has shape {s.shape}, expected (3, 3)")
        stress = VASP_KBAR_TO_GPA * s
    return make_sample(
        structure, energy_per_atom=e_pa, energy_total=e_tot, forces=frame.get("force"),
        stress_gpa=stress, magmom=frame.get("magmom"), id=f"{name}:{mp_id}/{frame_id}",
        source=source, info={"mp_id": mp_id, "frame_id": frame_id},
    )


def read_mptrj(
    path: str | os.PathLike,
    *,
    skip_bad: bool = False,
    stats: dict | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[Sample]:
    """Stream the frames of an MPtrj JSON file (``.json`` or ``.json.gz``).

    Layout: ``{mp_id: {frame_id: {"structure": <pymatgen dict>, "energy_per_atom" (eV/atom),
    "corrected_total_energy" (eV), "force" (n, 3) eV/Å, "stress" (3, 3) kBar VASP sign,
    "magmom" (n,) μB or None, ...}}}``. The file is read ``chunk_size`` characters at a time and
    decoded one mp_id at a time: the 12 GB MPtrj file is never held in memory.

    Energy: ``energy_per_atom``, else ``corrected_total_energy`` / n_atoms. Stress: −0.1 × kBar
    (GPa, positive = tensile). Magnetic moments: magnitudes. ``force``, ``stress`` or ``magmom``
    that is null (or an empty list) is a missing label. Sample ids are
    ``"<file name>:<mp_id>/<frame_id>"``.
    """
    source = str(path)
    name = Path(path).name

    def entries() -> Iterator[tuple[str, Callable[[], Sample]]]:
        with _open_text(path) as fh:
            for mp_id, frames in iter_json_top_level(fh, source=source, chunk_size=chunk_size):
                if not isinstance(frames, dict):
                    def bad(frames: Any = frames) -> Sample:
                        raise BadEntry("bad value", f"value is a {type(frames).__name__}, "
                                       "expected an object of frames")
                    yield str(mp_id), bad
                    continue
                for frame_id, frame in frames.items():
                    yield f"{mp_id}/{frame_id}", (
                        lambda f=frame, m=mp_id, k=frame_id: _mptrj_sample(f, m, k, name, source))

    return _guarded(source, entries(), skip_bad, stats)


# ------------------------------------------------------------------------------------------------
# mlearn


def _mlearn_sample(frame: Any, index: int, name: str, source: str) -> Sample:
    if not isinstance(frame, dict):
        raise BadEntry("bad value", f"frame is a {type(frame).__name__}, expected a dict")
    structure = _structure_from_dict(_require(frame, "structure"))
    outputs = _require(frame, "outputs")
    if not isinstance(outputs, dict):
        raise BadEntry("bad value", "'outputs' is not an object")
    energy = _require(outputs, "energy")
    if energy is None:
        raise BadEntry("missing key", "outputs.energy is null")
    n_label = frame.get("num_atoms")
    if n_label is not None and n_label != len(structure):
        raise BadEntry("bad shape", f"num_atoms is {n_label} but the structure has "
                       f"{len(structure)} sites")
    virial = outputs.get("virial_stress")
    stress = None
    if not _is_missing(virial):
        stress = VASP_KBAR_TO_GPA * _stress33(virial, "virial_stress", MLEARN_VOIGT_PAIRS)
    info = {k: frame[k] for k in ("group", "description", "tag") if k in frame}
    return make_sample(structure, energy_total=energy, forces=outputs.get("forces"),
                       stress_gpa=stress, id=f"{name}:{index}", source=source, info=info)


def read_mlearn(
    path: str | os.PathLike,
    *,
    skip_bad: bool = False,
    stats: dict | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[Sample]:
    """Stream the frames of an mlearn JSON list.

    Each frame: ``{"structure": <pymatgen dict>, "num_atoms", "group", "outputs": {"energy"
    (total eV), "forces" (n, 3) eV/Å, "virial_stress" (6 numbers, kBar, VASP sign, order xx, yy,
    zz, xy, yz, zx)}}``. Energy per atom = energy / n_atoms; stress = −0.1 × virial (GPa,
    positive = tensile). No magnetic moments. Sample ids are ``"<file name>:<list index>"``;
    ``Sample.info`` keeps ``group``, ``description`` and ``tag``.
    """
    source = str(path)
    name = Path(path).name

    def entries() -> Iterator[tuple[str, Callable[[], Sample]]]:
        with _open_text(path) as fh:
            for index, frame in iter_json_top_level(fh, source=source, chunk_size=chunk_size):
                yield str(index), (lambda f=frame, i=index: _mlearn_sample(f, i, name, source))

    return _guarded(source, entries(), skip_bad, stats)


# ------------------------------------------------------------------------------------------------
# ASE (extxyz, ASE database, anything ase.io reads)


def _atoms_to_structure(atoms: Any) -> Any:
    from pymatgen.core import Lattice, Structure

    z = np.asarray(atoms.get_atomic_numbers(), dtype=np.int64)
    if z.size == 0:
        raise BadEntry("empty structure", "structure is empty (no atoms)")
    bad = (z < 1) | (z > MAX_ATOMIC_NUMBER)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise BadEntry("unknown element", f"structure has atomic number {int(z[i])} at site {i}; "
                       f"the model covers Z = 1..{MAX_ATOMIC_NUMBER}")
    cell = np.asarray(atoms.get_cell()[:], dtype=np.float64)
    pos = np.asarray(atoms.get_positions(), dtype=np.float64)
    if not (np.isfinite(cell).all() and np.isfinite(pos).all()):
        raise BadEntry("non-finite", "structure has a NaN or inf coordinate or lattice vector")
    if not abs(float(np.linalg.det(cell))) > 1e-6:
        raise BadEntry("bad structure", "structure has no (or a singular) cell; periodic cells only")
    lattice = Lattice(cell, pbc=tuple(bool(p) for p in atoms.get_pbc()))
    return Structure(lattice, z.tolist(), pos, coords_are_cartesian=True)


def _calc_results(atoms: Any) -> dict:
    calc = getattr(atoms, "calc", None)
    return dict(getattr(calc, "results", None) or {}) if calc is not None else {}


def _lookup(key: str | None, default: str, stores: Sequence[dict], results: dict) -> Any:
    """A label: with no key, the calculator's ``default`` property, else ``default`` in the stores;
    with a key, ``key`` in the stores (info, arrays, db key-value pairs and data), else in the
    calculator's results."""
    if key is None:
        if results.get(default) is not None:
            return results[default]
        key = default
    for store in stores:
        if key in store and store[key] is not None:
            return store[key]
    return results.get(key)


def _ase_sample(
    atoms: Any, entry: str, name: str, source: str, extra: dict | None, keys: dict, stress_factor: float
) -> Sample:
    structure = _atoms_to_structure(atoms)
    results = _calc_results(atoms)
    stores = [atoms.info, atoms.arrays] + ([extra] if extra else [])
    energy = _lookup(keys["energy"], "energy", stores, results)
    if energy is None:
        where = f"key {keys['energy']!r}" if keys["energy"] else "calculator energy or 'energy' key"
        raise BadEntry("missing key", f"no energy label ({where})")
    stress = _lookup(keys["stress"], "stress", stores, results)
    if not _is_missing(stress):
        stress = stress_factor * _stress33(stress, "stress", ASE_VOIGT_PAIRS)
    return make_sample(
        structure, energy_total=energy, forces=_lookup(keys["forces"], "forces", stores, results),
        stress_gpa=stress, magmom=_lookup(keys["magmom"], "magmoms", stores, results),
        id=f"{name}:{entry}", source=source, info={"index": entry},
    )


def _selected_indices(index: Any, n: int | None) -> Callable[[int], str]:
    """Map the i-th selected frame to its index in the file (when knowable)."""
    from ase.io.formats import string2index

    sel = string2index(index) if isinstance(index, str) else index
    if isinstance(sel, int):
        return (lambda i: str(sel)) if sel >= 0 or n is None else (lambda i: str(n + sel))
    if isinstance(sel, slice):
        if n is not None:
            rng = range(*sel.indices(n))
            return lambda i: str(rng[i])
        start, step = sel.start or 0, sel.step or 1
        if start >= 0 and step > 0:
            return lambda i: str(start + i * step)
    return lambda i: f"selection[{i}]"


def read_ase(
    path: str | os.PathLike,
    *,
    index: str | int | slice = ":",
    format: str | None = None,
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
    magmom_key: str | None = None,
    stress_unit: Literal["eV/A3", "GPa", "kBar"] = "eV/A3",
    stress_sign: Literal["ase", "vasp", "chgnet"] = "ase",
    skip_bad: bool = False,
    stats: dict | None = None,
) -> Iterator[Sample]:
    """Stream frames of an extxyz file, an ASE database (``.db``) or any file ``ase.io`` reads.

    Labels, by default, come from the calculator attached to each frame (extxyz ``energy``,
    ``forces``, ``stress`` and ``magmoms`` fields become a SinglePointCalculator; a database row
    keeps its calculator results): total energy (eV), forces (eV/Å), stress (eV/Å³, ASE sign,
    positive = tensile) and magnetic moments (μB). Name a key to read a label from ``atoms.info``
    / ``atoms.arrays`` (extxyz) or from the row's key-value pairs / data (database), e.g.
    ``energy_key="REF_energy"``; a named key that is absent from a frame falls back to the
    calculator result of that name, else the label is missing (energy is required).

    The energy is a *total* energy: it is divided by the number of atoms. ``stress_unit`` and
    ``stress_sign`` describe the stress as stored in the file (6-vector in ASE's Voigt order xx,
    yy, zz, yz, xz, xy, 9-vector or 3×3); the defaults are ASE's convention. It is converted to GPa,
    positive = tensile: × 160.21766208 for eV/Å³, × 0.1 for kBar, × −1 for the VASP sign.

    Sample ids are ``"<file name>:<frame index>"`` (extxyz and others) or ``"<file name>:<row id>"``
    (database).
    """
    if stress_unit not in STRESS_UNITS:
        raise ValueError(f"stress_unit must be one of {sorted(STRESS_UNITS)}, got {stress_unit!r}")
    if stress_sign not in STRESS_SIGNS:
        raise ValueError(f"stress_sign must be one of {sorted(STRESS_SIGNS)}, got {stress_sign!r}")
    factor = STRESS_UNITS[stress_unit] * STRESS_SIGNS[stress_sign]
    keys = {"energy": energy_key, "forces": forces_key, "stress": stress_key, "magmom": magmom_key}
    source = str(path)
    name = Path(path).name
    if format is None and _suffix(path) == ".db":
        format = "db"

    def entries() -> Iterator[tuple[str, Callable[[], Sample]]]:
        if format == "db":
            yield from _db_entries()
            return
        import ase.io

        entry_of = _selected_indices(index, None)
        it = ase.io.iread(source, index=index, format=format)
        i = 0
        while True:
            try:
                atoms = next(it)
            except StopIteration:
                return
            except Exception as exc:  # a parse error in the file: not an entry that can be skipped
                after = f" after entry {entry_of(i - 1)}" if i else ""
                raise ValueError(f"{source}: cannot read frame{after}: {type(exc).__name__}: "
                                 f"{exc}") from exc
            entry = entry_of(i)
            yield entry, (lambda a=atoms, e=entry: _ase_sample(a, e, name, source, None, keys, factor))
            i += 1

    def _db_entries() -> Iterator[tuple[str, Callable[[], Sample]]]:
        from ase.db import connect

        if not Path(source).is_file():  # connect() would create an empty database
            raise FileNotFoundError(source)
        db = connect(source)
        n = db.count()
        sel = _selected_indices(index, n)
        picks = [int(sel(i)) for i in range(_n_selected(index, n))]
        rows = db.select() if picks == list(range(n)) else _rows_at(db, picks)
        for row in rows:
            entry = str(row.id)

            def build(row: Any = row, entry: str = entry) -> Sample:
                extra = dict(row.key_value_pairs)
                extra.update(row.get("data", {}) or {})
                return _ase_sample(row.toatoms(), entry, name, source, extra, keys, factor)

            yield entry, build

    return _guarded(source, entries(), skip_bad, stats)


def _n_selected(index: Any, n: int) -> int:
    from ase.io.formats import string2index

    sel = string2index(index) if isinstance(index, str) else index
    if isinstance(sel, int):
        return 1
    return len(range(*sel.indices(n)))


def _rows_at(db: Any, positions: list[int]) -> Iterator[Any]:
    """Rows at the given 0-based positions of the database's id order."""
    ids = [row.id for row in db.select(include_data=False)]
    for p in positions:
        yield db.get(id=ids[p])


# ------------------------------------------------------------------------------------------------
# in-memory structures


def samples_from_structures(
    structures: Sequence[Any],
    energies: Sequence[float],
    forces: Sequence[Any] | None = None,
    stresses: Sequence[Any] | None = None,
    magmoms: Sequence[Any] | None = None,
    ids: Sequence[str] | None = None,
    *,
    energy_is_total: bool = False,
    source: str = "<memory>",
    skip_bad: bool = False,
    stats: dict | None = None,
) -> list[Sample]:
    """Samples from in-memory pymatgen structures and labels.

    ``energies`` are eV/atom (eV when ``energy_is_total``), ``forces`` (n, 3) eV/Å, ``stresses``
    (3, 3) GPa with CHGNet's sign (positive = tensile), ``magmoms`` (n,) μB. Any label list may be
    None, and any element of a label list may be None (missing). Ids default to the list index.
    """
    n = len(structures)
    for what, seq in (("energies", energies), ("forces", forces), ("stresses", stresses),
                      ("magmoms", magmoms), ("ids", ids)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{what} has {len(seq)} entries for {n} structures")

    def at(seq: Sequence[Any] | None, i: int) -> Any:
        return None if seq is None else seq[i]

    def entries() -> Iterator[tuple[str, Callable[[], Sample]]]:
        for i, s in enumerate(structures):
            sid = str(ids[i]) if ids is not None else str(i)

            def build(i: int = i, s: Any = s, sid: str = sid) -> Sample:
                if not (hasattr(s, "lattice") and hasattr(s, "sites")):
                    raise BadEntry("bad structure", f"expected a pymatgen Structure, got "
                                   f"{type(s).__name__}")
                e = energies[i]
                return make_sample(
                    s, energy_per_atom=None if energy_is_total else e,
                    energy_total=e if energy_is_total else None, forces=at(forces, i),
                    stress_gpa=at(stresses, i), magmom=at(magmoms, i), id=sid, source=source,
                )

            yield sid, build

    return list(_guarded(source, entries(), skip_bad, stats))


# ------------------------------------------------------------------------------------------------
# dispatch


def _suffix(path: str | os.PathLike) -> str:
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return Path(name).suffix


def detect_format(path: str | os.PathLike) -> str:
    """The dataset format of a file: from its extension, and for JSON from its top level."""
    ext = _suffix(path)
    if ext == ".json":
        return _peek_json_kind(path)
    if ext in (".xyz", ".extxyz"):
        return "extxyz"
    if ext == ".db":
        return "asedb"
    return "ase"


def read_dataset(path: str | os.PathLike, format: Format = "auto", **kw: Any) -> Iterator[Sample]:
    """Stream the samples of a dataset file; ``kw`` go to the reader.

    Formats: ``"mptrj"`` (:func:`read_mptrj`), ``"mlearn"`` (:func:`read_mlearn`), ``"extxyz"``,
    ``"asedb"`` and ``"ase"`` (any format ``ase.io`` knows; all :func:`read_ase`). ``"auto"``
    picks by extension (``.xyz``/``.extxyz``, ``.db``, ``.json``/``.json.gz``; others go to ASE) and,
    for JSON, by the top level: an object of objects is MPtrj, a list is mlearn.
    """
    if format == "auto":
        format = detect_format(path)  # type: ignore[assignment]
    if format == "mptrj":
        return read_mptrj(path, **kw)
    if format == "mlearn":
        return read_mlearn(path, **kw)
    if format == "extxyz":
        return read_ase(path, format="extxyz", **kw)
    if format == "asedb":
        return read_ase(path, format="db", **kw)
    if format == "ase":
        return read_ase(path, **kw)
    raise ValueError(f"unknown dataset format {format!r}; use 'auto', 'mptrj', 'extxyz', 'asedb', "
                     f"'ase' or 'mlearn'")


__all__ = [
    "BadEntry",
    "Sample",
    "check_structure",
    "detect_format",
    "iter_json_top_level",
    "make_sample",
    "read_ase",
    "read_dataset",
    "read_mlearn",
    "read_mptrj",
    "samples_from_structures",
]
