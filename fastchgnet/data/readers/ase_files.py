"""Files ASE reads: extxyz, ASE databases (``.db``) and any other ``ase.io`` format.

ASE (``ase.io``, ``ase.db``) and pymatgen are imported when a file is read, so that
``import fastchgnet`` does not import them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np

from fastchgnet.data.readers.common import (ASE_VOIGT_PAIRS, STRESS_SIGNS, STRESS_UNITS, BadEntry, Sample,
                                            _guarded, _is_missing, _stress33, _suffix, check_atoms,
                                            make_sample)

def _atoms_to_structure(atoms: Any) -> Any:
    from pymatgen.core import Lattice, Structure

    z = np.asarray(atoms.get_atomic_numbers(), dtype=np.int64)
    cell = np.asarray(atoms.get_cell()[:], dtype=np.float64)
    pos = np.asarray(atoms.get_positions(), dtype=np.float64)
    check_atoms(z, pos, cell)
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


__all__ = ["read_ase"]
