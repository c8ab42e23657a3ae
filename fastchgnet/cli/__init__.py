"""The ``fastchgnet`` command (also ``python -m fastchgnet``).

One module per command family — :mod:`~fastchgnet.cli.bench`, :mod:`~fastchgnet.cli.predict`,
:mod:`~fastchgnet.cli.demo`, :mod:`~fastchgnet.cli.train` (train, evaluate),
:mod:`~fastchgnet.cli.md` (relax, md) — and their shared helpers in :mod:`~fastchgnet.cli.common`.
Each ``add_<name>(subparsers)`` adds a sub-parser and sets ``func`` (the handler, called with the
parsed ``argparse.Namespace`` and returning an exit code); :data:`COMMANDS` lists them in the
order of ``fastchgnet --help``. To add a command, append its ``add_<name>`` to ``COMMANDS`` — or
call :func:`register_command` from another module before :func:`main` runs. This package is a
leaf: nothing else in fastchgnet imports it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from fastchgnet import __version__
from fastchgnet.cli.bench import add_bench
from fastchgnet.cli.common import floats_arg, read_structures, summarize
from fastchgnet.cli.demo import add_demo
from fastchgnet.cli.lammps import add_lammps
from fastchgnet.cli.md import add_md, add_relax
from fastchgnet.cli.predict import add_predict
from fastchgnet.cli.properties import add_elastic, add_eos, add_phonons
from fastchgnet.cli.train import add_evaluate, add_train

# Imports are at module level (fastchgnet.train and fastchgnet.md add a few percent to
# ``fastchgnet --help``, whose time is torch's), except three kept inside the code that uses them,
# because ``--help`` builds every sub-parser and so loads every command module: pymatgen (~0.15 s)
# and ase.io (~0.75 s) for the file readers (common.read_structures, demo --predict), and the
# benchmark harness (fastchgnet.bench), which only ``bench`` and ``demo --predict`` run.

__all__ = ["COMMANDS", "AddCommand", "build_parser", "floats_arg", "main", "read_structures",
           "register_command", "summarize"]

AddCommand = Callable[["argparse._SubParsersAction"], None]

COMMANDS: list[AddCommand] = [add_bench, add_predict, add_demo, add_train, add_evaluate, add_relax,
                              add_md, add_lammps, add_eos, add_phonons, add_elastic]


def register_command(add: AddCommand) -> None:
    """Add a subcommand: ``add(subparsers)`` must create a sub-parser and ``set_defaults(func=...)``."""
    if add not in COMMANDS:
        COMMANDS.append(add)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastchgnet", description="Fast CHGNet-class universal interatomic potentials.")
    parser.add_argument("--version", action="version", version=f"fastchgnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"fastchgnet {args.command}: error: {exc}", file=sys.stderr)
        return 1
