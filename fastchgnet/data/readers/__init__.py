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

Modules
-------

``common`` (:class:`Sample`, :class:`BadEntry`, :func:`make_sample`, :func:`check_structure`),
``json_stream`` (:func:`iter_json_top_level`), ``mptrj`` (:func:`read_mptrj`), ``mlearn``
(:func:`read_mlearn`), ``ase_files`` (:func:`read_ase`), ``structures``
(:func:`samples_from_structures`), ``bundled`` (the datasets shipped with the package, named by a
spec such as ``"mlearn:Ge"``: :func:`resolve_dataset_spec`); this package's ``__init__`` picks the
reader (:func:`detect_format`, :func:`read_dataset`) and re-exports their names.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Literal

from fastchgnet.data.readers.ase_files import read_ase
from fastchgnet.data.readers.bundled import is_dataset_spec, mlearn_path, mlearn_sets, resolve_dataset_spec
from fastchgnet.data.readers.common import BadEntry, Sample, _suffix, check_structure, make_sample
from fastchgnet.data.readers.json_stream import _peek_json_kind, iter_json_top_level
from fastchgnet.data.readers.mlearn import read_mlearn
from fastchgnet.data.readers.mptrj import read_mptrj
from fastchgnet.data.readers.structures import samples_from_structures

# the other names of the single module this package replaced, still importable from here
from fastchgnet.data.readers.common import ASE_VOIGT_PAIRS, MLEARN_VOIGT_PAIRS, _guarded  # noqa: F401
from fastchgnet.data.readers.common import STRESS_SIGNS, STRESS_UNITS  # noqa: F401
from fastchgnet.data.readers.json_stream import DEFAULT_CHUNK_SIZE, MAX_ENTRY_CHARS  # noqa: F401
from fastchgnet.data.readers.json_stream import _open_text  # noqa: F401
from fastchgnet.units import EV_A3_TO_GPA, EV_PER_A3_TO_GPA, KBAR_TO_GPA, VASP_KBAR_TO_GPA  # noqa: F401

Format = Literal["auto", "mptrj", "extxyz", "asedb", "ase", "mlearn"]


def detect_format(path: str | os.PathLike) -> str:
    """The dataset format of a file: from its extension, and for JSON from its top level. A
    bundled-dataset spec (``"mlearn:Ge"``) is resolved to its file first."""
    path = resolve_dataset_spec(path)  # type: ignore[assignment]
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
    for JSON, by the top level: an object of objects is MPtrj, a list is mlearn. ``path`` may also
    name a bundled dataset: ``"mlearn:Ge"`` (training set), ``"mlearn:Ge:test"``
    (:func:`resolve_dataset_spec`).
    """
    path = resolve_dataset_spec(path)  # type: ignore[assignment]
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
    "is_dataset_spec",
    "iter_json_top_level",
    "make_sample",
    "mlearn_path",
    "mlearn_sets",
    "read_ase",
    "read_dataset",
    "read_mlearn",
    "read_mptrj",
    "resolve_dataset_spec",
    "samples_from_structures",
]
