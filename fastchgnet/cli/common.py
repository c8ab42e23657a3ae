"""Helpers shared by the subcommands: the ``--device`` option, reading structure files, formulas,
summaries and tables of predictions, comma-separated numbers."""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import numpy as np

from fastchgnet.tables import fmt_or_na, text_table

__all__ = ["add_device_arg", "floats_arg", "fmt", "formula", "prediction_table", "read_structures",
           "summarize", "text_table"]


def add_device_arg(p: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--device``; resolve it with :func:`fastchgnet.device.resolve_device`."""
    p.add_argument("--device", default=default,
                   help="cpu, cuda, cuda:N or auto (cuda when available) [default: %(default)s]")


def floats_arg(text: str, n: int, what: str) -> list[float]:
    """``n`` comma-separated numbers of option ``what`` (ValueError naming the option otherwise)."""
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{what} must be {n} comma-separated numbers, got {text!r}") from None
    if len(vals) != n:
        raise ValueError(f"{what} must be {n} comma-separated numbers, got {text!r}")
    return vals


def read_structures(path: str) -> list[tuple[str, Any]]:
    """``(label, structure)`` pairs of one file: pymatgen ``Structure.from_file`` first, then
    ``ase.io.read`` (every frame of a multi-frame file)."""
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
