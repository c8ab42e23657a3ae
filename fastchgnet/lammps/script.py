"""Run a LAMMPS input script with a fastchgnet model as its potential (:func:`run_input`).

The script is an ordinary LAMMPS input without ``pair_style``/``pair_coeff``. It runs in two
parts: everything up to and including the first command that creates the atoms (``read_data``,
``read_restart`` or ``create_atoms``), then :func:`~fastchgnet.lammps.fix.attach`, then the rest
(from a file, so ``label``/``jump``/``include`` keep working there). If atoms are created inside an
``include``d file, the model is attached just before the first ``run``/``minimize``/``rerun``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from fastchgnet.lammps.fix import FastCHGNetFix, attach
from fastchgnet.lammps.loader import new_lammps

__all__ = ["CREATES_ATOMS", "run_input", "script_skin", "split_script"]

CREATES_ATOMS = ("read_data", "read_restart", "create_atoms")
RUNS = ("run", "minimize", "rerun", "minimize/kk")
FORBIDDEN = ("pair_style", "pair_coeff", "pair_modify")


def _logical_lines(text: str) -> list[tuple[int, int, str]]:
    """(first line index, last line index, command word) of each command (``&`` continues)."""
    lines = text.splitlines()
    out = []
    i = 0
    while i < len(lines):
        start, cmd = i, lines[i]
        while cmd.rstrip().endswith("&") and i + 1 < len(lines):
            i += 1
            cmd = cmd.rstrip()[:-1] + " " + lines[i]
        word = cmd.split("#", 1)[0].split()
        out.append((start, i, word[0] if word else ""))
        i += 1
    return out


def split_script(text: str, name: str = "input") -> tuple[str, str]:
    """(head, tail) of a script: the model is attached between them.

    Raises:
        ValueError: the script sets a pair style, or never creates atoms nor runs.
    """
    lines = text.splitlines()
    cut = None
    for first, last, word in _logical_lines(text):
        if word in FORBIDDEN:
            raise ValueError(f"{name} line {first + 1}: '{word}' — the fastchgnet model is the "
                             f"potential: remove pair_style/pair_coeff from the script (elements "
                             f"are given with --elements / elements=)")
        if cut is None and word in CREATES_ATOMS:
            cut = last + 1
        elif cut is None and word in RUNS:
            cut = first
    if cut is None:
        raise ValueError(f"{name} never creates atoms ({', '.join(CREATES_ATOMS)}) nor runs "
                         f"({', '.join(RUNS[:3])}): nothing to attach the model to")
    return "\n".join(lines[:cut]) + "\n", "\n".join(lines[cut:]) + "\n"


def script_skin(text: str, default: float = 2.0) -> float:
    """The largest numeric skin of the script's ``neighbor`` commands (``default`` if none)."""
    lines = text.splitlines()
    skins = []
    for first, last, word in _logical_lines(text):
        if word == "neighbor":
            parts = " ".join(lines[first:last + 1]).replace("&", " ").split("#", 1)[0].split()
            try:
                skins.append(float(parts[1]))
            except (IndexError, ValueError):  # a variable: keep the default
                pass
    return max(skins, default=default)


def run_input(path: str | os.PathLike, model: Any, elements: Sequence[str] | str, *,
              mode: str = "auto", device: str | torch.device | None = None,
              dtype: torch.dtype | None = None, variables: dict[str, Any] | None = None,
              lammps_args: Sequence[str] | None = None, on_isolated_atoms: str = "error",
              close: bool = True) -> FastCHGNetFix:
    """Run the LAMMPS input script ``path`` with ``model`` attached (on every MPI rank).

    Args:
        path: the input script (``units metal``; no ``pair_style``).
        model, elements, mode, device, dtype, on_isolated_atoms: as in
            :func:`~fastchgnet.lammps.fix.attach`.
        variables: ``{"T": 300}`` -> ``-var T 300`` (index-style variables of the script).
        lammps_args: other LAMMPS command-line arguments (default ``-log none -nocite``; give
            ``["-log", "log.lammps"]`` for a log file, ``["-screen", "none"]`` for silence).
        close: close the LAMMPS instance at the end (False keeps it in ``fix.lmp``).

    Returns the fix (``fix.n_calls``, ``fix.last``; ``fix.lmp`` when ``close=False``).

    Raises:
        ValueError for a script with a pair style or without atoms; RuntimeError when the model
        failed during the run (the run was stopped); LAMMPS's own exceptions for its errors.
    """
    path = Path(path)
    text = path.read_text()
    head, tail = split_script(text, str(path))
    args = ["-nocite", "-log", "none"] if lammps_args is None else list(lammps_args)
    for k, v in (variables or {}).items():
        args += ["-var", str(k), str(v)]
    lmp = new_lammps(args)
    try:
        lmp.commands_string(head)
        fix = attach(lmp, model, elements, mode=mode, device=device, dtype=dtype,
                     on_isolated_atoms=on_isolated_atoms, skin=max(2.0, script_skin(text)))
        with tempfile.TemporaryDirectory(prefix="fastchgnet-lammps-") as tmp:
            rest = Path(tmp) / path.name
            rest.write_text(tail)
            lmp.file(str(rest))
        fix.check()
    finally:
        if close:
            lmp.close()
    return fix
