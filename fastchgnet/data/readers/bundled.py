"""Datasets shipped with the package, named by a spec instead of a path: ``mlearn:Ge``.

The mlearn DFT sets (Zuo et al., J. Phys. Chem. A 124, 731 (2020); BSD-3, see
``fastchgnet/assets/mlearn/LICENSE`` and ``docs/mlearn.md``) are bundled in
``fastchgnet/assets/mlearn/`` as gzip-compressed mlearn JSON, ``<El>-training.json.gz`` and
``<El>-test.json.gz``, and read by :func:`~fastchgnet.data.readers.read_mlearn` like any mlearn
file (streamed; the format is inferred from the file).

Spec syntax (wherever a dataset path is accepted, e.g. ``--data``)::

    mlearn:Ge          the Ge training set
    mlearn:Ge:train    the same (also ``:training``)
    mlearn:Ge:test     the Ge test set

The element is matched without regard to case. :func:`resolve_dataset_spec` turns a spec into the
bundled file's path and leaves anything else (a path) unchanged; an existing file whose name
looks like a spec is taken as the file.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MLEARN_PREFIX", "is_dataset_spec", "mlearn_dir", "mlearn_path", "mlearn_sets",
           "resolve_dataset_spec"]

MLEARN_PREFIX = "mlearn:"
# spec split name -> file split name
_SPLITS = {"train": "training", "training": "training", "test": "test"}
_SPLIT_NAMES = {"training": "train", "test": "test"}


def mlearn_dir() -> Path:
    """The folder of the bundled mlearn sets (``fastchgnet/assets/mlearn``)."""
    return Path(__file__).resolve().parents[2] / "assets" / "mlearn"


def mlearn_sets() -> dict[str, tuple[str, ...]]:
    """The bundled sets: element -> its splits (``"train"``, ``"test"``), elements sorted."""
    found: dict[str, list[str]] = {}
    for p in sorted(mlearn_dir().glob("*-*.json.gz")):
        element, _, split = p.name[: -len(".json.gz")].partition("-")
        if split in _SPLIT_NAMES:
            found.setdefault(element, []).append(_SPLIT_NAMES[split])
    return {el: tuple(sorted(s, key=("train", "test").index)) for el, s in sorted(found.items())}


def _listing(sets: dict[str, tuple[str, ...]]) -> str:
    return ", ".join(f"{el} ({'/'.join(s)})" for el, s in sets.items()) or "none"


def mlearn_path(element: str, split: str = "train") -> Path:
    """The bundled file of one element's ``"train"`` or ``"test"`` set.

    Raises ValueError naming what is bundled for an unknown element or split, or a split the
    element does not have (Cu and Ni have only test sets).
    """
    what = f"{MLEARN_PREFIX}{element}" + (f":{split}" if split != "train" else "")
    key = _SPLITS.get(split.lower())
    if key is None:
        raise ValueError(f"{what}: unknown split {split!r}; use {MLEARN_PREFIX}<element> (training set) "
                         f"or {MLEARN_PREFIX}<element>:test")
    sets = mlearn_sets()
    if not sets:
        raise FileNotFoundError(f"{what}: the bundled mlearn data is missing from {mlearn_dir()} "
                                "(a broken install; regenerate it with scripts/bundle_mlearn.py)")
    match = {el.lower(): el for el in sets}.get(element.strip().lower())
    if match is None:
        raise ValueError(f"{what}: no bundled mlearn set for element {element.strip()!r}; "
                         f"bundled: {_listing(sets)}")
    if _SPLIT_NAMES[key] not in sets[match]:
        have = sets[match]
        hint = " or ".join(f"{MLEARN_PREFIX}{match}" + ("" if s == "train" else f":{s}") for s in have)
        raise ValueError(f"{what}: the mlearn {match} data has no {_SPLIT_NAMES[key]} set (only "
                         f"{'/'.join(have)}); use {hint}")
    return mlearn_dir() / f"{match}-{key}.json.gz"


def is_dataset_spec(data: object) -> bool:
    """Whether ``data`` is a bundled-dataset spec (``"mlearn:..."``) rather than a path."""
    return isinstance(data, str) and data.lower().startswith(MLEARN_PREFIX)


def resolve_dataset_spec(data: str | os.PathLike | None) -> str | os.PathLike | None:
    """The path of a bundled dataset for a spec (``"mlearn:Ge"``, ``"mlearn:Ge:test"``); anything
    else (None, a path, an existing file named like a spec) is returned unchanged.

    Raises ValueError for a malformed spec or one naming no bundled set, listing what is bundled.
    """
    if not is_dataset_spec(data) or Path(data).exists():  # type: ignore[arg-type]
        return data
    rest = str(data)[len(MLEARN_PREFIX):]
    parts = rest.split(":")
    if not parts[0].strip() or len(parts) > 2:
        raise ValueError(f"{data}: expected {MLEARN_PREFIX}<element> or {MLEARN_PREFIX}<element>:test "
                         f"(bundled: {_listing(mlearn_sets())})")
    return mlearn_path(parts[0], parts[1] if len(parts) == 2 else "train")
