"""The built-in training dataset: ~2,000 varied crystals labelled by CHGNet 0.3.0.

``fastchgnet train`` with no ``--data`` trains on it. The labels are *distilled from CHGNet 0.3.0,
not DFT*: good for demos, smoke tests and benchmarks, not for scientific fitting. The file is made
by ``scripts/make_builtin_dataset.py``; its contents and format are described in
``docs/builtin_dataset.md``.

File format (``fastchgnet/assets/builtin_dataset.npz``, flat arrays; n structures, N atoms):

=================  ===============  ===========================================================
array              shape, dtype     content
=================  ===============  ===========================================================
atomic_numbers     (N,) int8/int16  Z of every atom, structure after structure
positions          (N, 3) float64   Cartesian coordinates, Å
lattice            (n, 3, 3) f64    lattice vectors (rows), Å
atom_ptr           (n + 1,) int64   atoms of structure i are ``atom_ptr[i]:atom_ptr[i + 1]``
energy_per_atom    (n,) float64     eV/atom
forces             (N, 3) float32   eV/Å
stress             (n, 3, 3) f32    GPa, CHGNet's (and ASE's) sign: positive = tensile
magmom             (N,) float32     μB (magnitudes)
ids                (n,) str         e.g. ``"builtin-00000-perovskite-SrTiO3"``
meta               () str           JSON: generator, seed, versions, units, counts
=================  ===============  ===========================================================

The units and signs are those of :class:`~fastchgnet.data.readers.Sample` (and of the model's
outputs), so the labels are used as they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from fastchgnet.data.readers.common import BadEntry, Sample, _guarded, make_sample

FILE_NAME = "builtin_dataset.npz"
ARRAYS = ("atomic_numbers", "positions", "lattice", "atom_ptr", "energy_per_atom", "forces",
          "stress", "magmom", "ids")


def builtin_dataset_path() -> Path:
    """Path of the built-in dataset file (``fastchgnet/assets/builtin_dataset.npz``)."""
    return Path(__file__).resolve().parents[1] / "assets" / FILE_NAME


def _load(path: str | os.PathLike | None) -> tuple[Path, dict]:
    p = Path(path) if path is not None else builtin_dataset_path()
    if not p.is_file():
        raise FileNotFoundError(f"built-in dataset not found: {p} (regenerate it with "
                                f"scripts/make_builtin_dataset.py)")
    with np.load(p, allow_pickle=False) as z:
        missing = [k for k in ARRAYS if k not in z.files]
        if missing:
            raise ValueError(f"{p}: not a built-in dataset file (missing arrays {missing})")
        arrays = {k: z[k] for k in z.files}
    n = len(arrays["ids"])
    ptr = arrays["atom_ptr"]
    n_atoms = int(ptr[-1]) if len(ptr) else 0
    problems = []
    if ptr.shape != (n + 1,) or (n and (ptr[0] != 0 or np.any(np.diff(ptr) < 0))):
        problems.append(f"atom_ptr has shape {ptr.shape} for {n} structures or is not "
                        f"non-decreasing from 0")
    for k, shape in (("atomic_numbers", (n_atoms,)), ("positions", (n_atoms, 3)),
                     ("forces", (n_atoms, 3)), ("magmom", (n_atoms,)),
                     ("lattice", (n, 3, 3)), ("stress", (n, 3, 3)), ("energy_per_atom", (n,))):
        if arrays[k].shape != shape:
            problems.append(f"{k} has shape {arrays[k].shape}, expected {shape}")
    if problems:
        raise ValueError(f"{p}: inconsistent built-in dataset: " + "; ".join(problems))
    return p, arrays


def builtin_info(path: str | os.PathLike | None = None) -> dict:
    """The dataset's metadata (the ``meta`` JSON): generator, seed, versions, units, counts."""
    p = Path(path) if path is not None else builtin_dataset_path()
    if not p.is_file():
        raise FileNotFoundError(f"built-in dataset not found: {p}")
    with np.load(p, allow_pickle=False) as z:
        if "meta" not in z.files:
            return {}
        return json.loads(str(z["meta"]))


def _id_info(entry: str) -> dict:
    """``{"prototype": ...}`` (plus ``"md_temperature_K"`` for an MD frame) from an id such as
    ``builtin-00000-perovskite-SrTiO3`` or ``builtin-01950-md600K-bcc-Fe-t040fs``."""
    parts = entry.split("-")
    if len(parts) < 4:
        return {}
    if parts[2].startswith("md") and parts[2].endswith("K") and parts[2][2:-1].isdigit():
        return {"prototype": parts[3], "md_temperature_K": int(parts[2][2:-1])}
    return {"prototype": parts[2]}


def read_builtin(
    path: str | os.PathLike | None = None,
    *,
    skip_bad: bool = False,
    stats: dict | None = None,
) -> Iterator[Sample]:
    """Yield the built-in dataset's samples (or those of another file in its format).

    Labels are used as stored (eV/atom, eV/Å, GPa with CHGNet's sign, μB) and validated by
    :func:`~fastchgnet.data.readers.make_sample`, as in the other readers. Sample ids are
    ``"builtin_dataset.npz:builtin-00000-perovskite-SrTiO3"``; ``Sample.source`` is the file's
    path; ``Sample.info`` holds ``{"index": i, "prototype": ...}`` (and ``"md_temperature_K"`` for
    an MD snapshot). ``skip_bad`` and ``stats``
    behave as in :func:`~fastchgnet.data.readers.read_dataset`.
    """
    p, arrays = _load(path)
    source = str(p)
    name = p.name

    def build(i: int) -> Sample:
        from pymatgen.core import Lattice, Structure

        a, b = int(arrays["atom_ptr"][i]), int(arrays["atom_ptr"][i + 1])
        entry = str(arrays["ids"][i])
        z = arrays["atomic_numbers"][a:b].astype(np.int64)
        if z.size == 0:
            raise BadEntry("empty structure", "structure is empty (no atoms)")
        try:  # Z range, finiteness etc. are checked by make_sample
            structure = Structure(Lattice(arrays["lattice"][i]), z.tolist(),
                                  arrays["positions"][a:b], coords_are_cartesian=True)
        except Exception as exc:  # a singular lattice and the like
            raise BadEntry("bad structure", f"structure cannot be built: {type(exc).__name__}: "
                           f"{exc}") from None
        info = {"index": i, **_id_info(entry)}
        return make_sample(structure, energy_per_atom=arrays["energy_per_atom"][i],
                           forces=arrays["forces"][a:b], stress_gpa=arrays["stress"][i],
                           magmom=arrays["magmom"][a:b], id=f"{name}:{entry}", source=source,
                           info=info)

    def entries() -> Iterator[tuple[str, Callable[[], Sample]]]:
        for i in range(len(arrays["ids"])):
            yield str(arrays["ids"][i]), (lambda i=i: build(i))

    return _guarded(source, entries(), skip_bad, stats)


__all__ = ["builtin_dataset_path", "builtin_info", "read_builtin"]
