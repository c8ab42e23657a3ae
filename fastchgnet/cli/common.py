"""Helpers shared by the subcommands: the ``--device`` option, reading structure files, output
file names, formulas, summaries and tables of predictions, comma-separated numbers."""

from __future__ import annotations

import argparse
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fastchgnet.tables import fmt_or_na, text_table

__all__ = ["add_device_arg", "add_model_choice", "check_new_files", "floats_arg", "fmt", "formula", "output_names",
           "prediction_table", "read_structures", "summarize", "text_table"]


def add_device_arg(p: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--device``; resolve it with :func:`fastchgnet.device.resolve_device`."""
    p.add_argument("--device", default=default,
                   help="cpu, cuda, cuda:N or auto (cuda when available) [default: %(default)s]")


def add_model_choice(p: argparse.ArgumentParser, device_default: str = "auto") -> None:
    """``--model`` (a pretrained name or a checkpoint), ``--device`` and ``--float64``: the model
    options every command that runs a model shares."""
    p.add_argument("--model", default="0.3.0",
                   help="pretrained name (0.3.0, 0.2.0, r2scan) or checkpoint path [%(default)s]")
    add_device_arg(p, default=device_default)
    p.add_argument("--float64", action="store_true", help="run the model in float64")


def floats_arg(text: str, n: int, what: str) -> list[float]:
    """``n`` comma-separated numbers of option ``what`` (ValueError naming the option otherwise)."""
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{what} must be {n} comma-separated numbers, got {text!r}") from None
    if len(vals) != n:
        raise ValueError(f"{what} must be {n} comma-separated numbers, got {text!r}")
    return vals


def _is_cif(path: str) -> bool:
    return ".cif" in Path(path).name.lower()  # pymatgen's pattern "*.cif*" (also .cif.gz, .mcif)


def _read_cif_blocks(path: str) -> list[tuple[str, Any]]:
    """Every data block of a CIF (``path@i`` labels when there are several); ValueError naming
    the file when some block holds no readable structure (nothing is dropped silently)."""
    from pymatgen.io.cif import CifParser  # lazy: see fastchgnet.cli

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parser = CifParser(path)
            n_blocks = len(parser.as_dict())
            structures = parser.parse_structures(primitive=False)
        except Exception as exc:  # pymatgen raises several types for unreadable files
            raise ValueError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    if not structures:
        raise ValueError(f"cannot read {path}: no structure in its {n_blocks} CIF data block(s)")
    if len(structures) != n_blocks:
        why = "; ".join(dict.fromkeys(str(w.message).splitlines()[0] for w in caught
                                      if "No structure parsed" in str(w.message)
                                      or "Issues encountered" in str(w.message)))
        raise ValueError(f"{path}: {n_blocks} CIF data block(s) but {len(structures)} readable "
                         f"structure(s); fix or remove the bad block(s)" + (f" ({why})" if why else ""))
    if len(structures) == 1:
        return [(path, structures[0])]
    return [(f"{path}@{i}", s) for i, s in enumerate(structures)]


def read_structures(path: str) -> list[tuple[str, Any]]:
    """``(label, structure)`` pairs of one file: pymatgen first (every data block of a CIF), then
    ``ase.io.read`` (every frame of a multi-frame file). Several structures in one file are
    labelled ``path@0``, ``path@1``, ..."""
    if _is_cif(path) and Path(path).is_file():
        return _read_cif_blocks(path)
    errors = []
    try:
        from pymatgen.core import Structure  # lazy: see fastchgnet.cli

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [(path, Structure.from_file(path))]
    except Exception as exc:  # unknown format for pymatgen: try ASE
        errors.append(f"pymatgen: {exc}")
    try:
        import ase.io  # lazy: see fastchgnet.cli

        frames = ase.io.read(path, index=":")
        if not isinstance(frames, list):
            frames = [frames]
        if len(frames) == 1:
            return [(path, frames[0])]
        return [(f"{path}@{i}", a) for i, a in enumerate(frames)]
    except Exception as exc:
        errors.append(f"ase: {exc}")
    raise ValueError(f"cannot read {path}: " + "; ".join(errors))


_FRAME = re.compile(r"^(.*)@(\d+)$")
# ASE guesses the format of any file whose name contains one of these (POSCAR.extxyz would be
# read as a VASP file), so output names carry them in lower case
_ASE_NAME_MARKERS = re.compile(r"POSCAR|CONTCAR|CENTCAR|OUTCAR|XDATCAR|CONFIG")


def _readable(name: str) -> str:
    return _ASE_NAME_MARKERS.sub(lambda m: m.group(0).lower(), name)


def _candidates(label: str) -> list[str]:
    """File-name stems of increasing specificity for ``path`` or ``path@i``: the stem, the name
    with its extension, then both under one, two, ... parent folders."""
    m = _FRAME.match(label)
    path, frame = (m.group(1), f"-{m.group(2)}") if m else (label, "")
    p = Path(path)
    stem = p.stem if p.suffix else p.name
    parents = [x for x in p.resolve().parent.parts[1:] if x]
    out = []
    for k in range(len(parents) + 1):
        above = parents[len(parents) - k:]
        out.append(_readable("_".join(above + [stem]) + frame))
        out.append(_readable("_".join(above + [p.name.replace(".", "_")]) + frame))
    return out


def output_names(labels: list[str]) -> list[str]:
    """Distinct output-file stems, one per structure label (``path`` or ``path@i``).

    Each structure is named after its file's stem (``mp1/POSCAR`` -> ``poscar``, ``Si.cif`` ->
    ``Si``, frame 3 of ``run.extxyz`` -> ``run-3``). Only when stems collide do the colliding ones
    get what tells them apart: their extension (``a_cif``, ``a_vasp``) or their parent folders
    (``mp1_poscar``, ``mp2_poscar``); the same file given twice gets ``-2``, ``-3``... Names are
    compared without case, so they stay distinct on case-insensitive file systems too. VASP file
    names in a stem (POSCAR, CONTCAR, OUTCAR, XDATCAR...) are written in lower case: ASE takes
    any file whose name contains ``POSCAR`` for a VASP file, whatever its extension.
    """
    cands = [_candidates(label) for label in labels]

    def name(i: int, lv: int) -> str:
        return cands[i][min(lv, len(cands[i]) - 1)]

    level = [0] * len(labels)
    while True:
        groups: dict[str, list[int]] = {}
        for i in range(len(labels)):
            groups.setdefault(name(i, level[i]).casefold(), []).append(i)
        moved = False
        for members in groups.values():
            if len(members) < 2:
                continue
            top = max(len(cands[i]) for i in members)
            for lv in range(max(level[i] for i in members) + 1, top):
                if len({name(i, lv).casefold() for i in members}) > 1:
                    for i in members:
                        level[i] = lv
                    moved = True
                    break
        if not moved:
            break
    seen: dict[str, int] = {}
    out = []
    for i in range(len(labels)):
        n = name(i, level[i])
        seen[n.casefold()] = seen.get(n.casefold(), 0) + 1
        out.append(n if seen[n.casefold()] == 1 else f"{n}-{seen[n.casefold()]}")
    return out


def check_new_files(paths: list[Path], overwrite: bool) -> None:
    """FileExistsError listing the files of ``paths`` that exist, unless ``overwrite``."""
    if overwrite:
        return
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing:
        more = f" and {len(existing) - 5} more" if len(existing) > 5 else ""
        raise FileExistsError(f"{len(existing)} output file(s) exist already: "
                              f"{', '.join(existing[:5])}{more}; pass --overwrite to replace "
                              f"them, or choose another --out")


def formula(s: Any) -> str:
    """Reduced formula of a pymatgen ``Structure`` or an ASE ``Atoms``."""
    if hasattr(s, "composition"):
        return s.composition.reduced_formula
    if hasattr(s, "get_chemical_formula"):
        return s.get_chemical_formula(mode="metal", empirical=True)
    return "?"


def summarize(pred: dict) -> dict[str, float | None]:
    """Energy per atom, max |F|, pressure (GPa, positive = compressed) and mean/max |m|."""
    out: dict[str, float | None] = {"e": float(pred["e"]) if "e" in pred else None,
                                    "fmax": None, "pressure": None, "m_mean": None, "m_max": None}
    if "f" in pred and len(pred["f"]):
        out["fmax"] = float(np.linalg.norm(pred["f"], axis=1).max())
    if "s" in pred:
        # stress is positive-tensile (the reference's sign): pressure = -trace / 3
        out["pressure"] = float(-np.trace(pred["s"]) / 3.0)
    if "m" in pred and len(pred["m"]):
        m = np.abs(np.asarray(pred["m"]))
        out["m_mean"], out["m_max"] = float(m.mean()), float(m.max())
    return out


def fmt(v: float | None, spec: str) -> str:
    """``v`` formatted with ``spec``, ``-`` for None."""
    return fmt_or_na(v, spec, "-")


def prediction_table(labels: list[str], structures: list, preds: list[dict]) -> str:
    """One row per structure: formula, atoms, energy, max |F|, pressure, mean |m|."""
    rows = []
    for label, s, p in zip(labels, structures, preds):
        sm = summarize(p)
        rows.append([label, formula(s), str(len(s)), fmt(sm["e"], ".5f"), fmt(sm["fmax"], ".4f"),
                     fmt(sm["pressure"], ".3f"), fmt(sm["m_mean"], ".3f")])
    return text_table(["structure", "formula", "atoms", "e eV/atom", "max|F| eV/A", "P GPa", "mean|m| muB"],
                      rows)
