"""``fastchgnet eos``, ``fastchgnet phonons`` and ``fastchgnet elastic``: the property workflows of
:mod:`fastchgnet.properties` (equation of state, phonons, elastic tensor) from the shell.

Each reads one structure, prints a short table to stdout and optionally writes a JSON record
(``--out``) and a plot (``--plot``). Existing output files are never replaced unless
``--overwrite`` is given; the check runs before any work.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastchgnet.cli.common import add_model_choice, check_new_files, read_structures, text_table
from fastchgnet.device import resolve_device

__all__ = ["add_elastic", "add_eos", "add_phonons"]


def _common_args(p: argparse.ArgumentParser, plot: bool = True) -> None:
    p.add_argument("file", metavar="FILE", help="structure file (CIF, POSCAR, extxyz, ...)")
    add_model_choice(p)
    p.add_argument("--relax", nargs="?", const="cell", default="none",
                   choices=["none", "positions", "cell"],
                   help="relax first: --relax (positions and cell) or --relax positions "
                        "[no relaxation]")
    p.add_argument("--fmax", type=float, default=None, help="relaxation force criterion, eV/A")
    p.add_argument("--out", default=None, help="JSON file for the result")
    if plot:
        p.add_argument("--plot", default=None, help="image file (png, pdf, svg)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (default: refuse before doing any work)")


def _one_structure(path: str) -> tuple[str, Any]:
    items = read_structures(path)
    if len(items) != 1:
        raise ValueError(f"{path} holds {len(items)} structures; this command takes one")
    return items[0]


def _prepare(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Check the outputs (before any work), read the structure; keyword arguments of the
    workflow shared by the commands."""
    check_new_files([Path(x) for x in (args.out, getattr(args, "plot", None)) if x],
                    args.overwrite)
    _, structure = _one_structure(args.file)
    kw: dict[str, Any] = {"device": resolve_device(args.device),
                          "dtype": torch.float64 if args.float64 else None,
                          "relax": args.relax}
    if args.fmax is not None:
        kw["fmax"] = args.fmax
    return structure, kw


def _write(args: argparse.Namespace, data: dict) -> None:
    if args.out:
        from fastchgnet.properties.eos import write_json

        data = {"file": args.file, "model": args.model, **data}
        print(f"# wrote {write_json(data, args.out, overwrite=args.overwrite)}")


# ----------------------------------------------------------------------------------------------
# eos


def add_eos(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eos", help="equation of state (V0, E0, bulk modulus)",
                       description="Scale the cell over a range of volumes, take the energies "
                                   "(ions relaxed at each volume for cells of more than one "
                                   "atom) and fit an equation of state with ASE.")
    _common_args(p)
    p.add_argument("--eos", default="birchmurnaghan",
                   help="ASE EOS: birchmurnaghan, murnaghan, vinet, birch, sj, ... [%(default)s]")
    p.add_argument("--points", type=int, default=11, help="number of volumes [%(default)s]")
    p.add_argument("--max-strain", type=float, default=0.06,
                   help="largest relative change of the volume (or of the lattice constant with "
                        "--linear) [%(default)s]")
    p.add_argument("--linear", action="store_true", help="--max-strain is a linear strain")
    p.add_argument("--no-ion-relax", action="store_true",
                   help="do not relax the ions at each volume")
    p.set_defaults(func=run_eos)


def run_eos(args: argparse.Namespace) -> int:
    from fastchgnet.properties.eos import equation_of_state

    structure, kw = _prepare(args)
    res = equation_of_state(structure, args.model, eos=args.eos, n_points=args.points,
                            max_strain=args.max_strain,
                            strain="linear" if args.linear else "volume",
                            relax_ions=False if args.no_ion_relax else "auto", plot=args.plot,
                            overwrite=args.overwrite, **kw)
    n = res.n_atoms
    print(text_table(["structure", "atoms", "eos", "V0 A^3/atom", "E0 eV/atom", "B GPa"],
                     [[res.formula, str(n), res.eos, f"{res.v0 / n:.4f}", f"{res.e0 / n:.5f}",
                       f"{res.b:.2f}"]]))
    _write(args, res.to_dict())
    if args.plot:
        print(f"# plot {args.plot}")
    return 0


# ----------------------------------------------------------------------------------------------
# phonons


def add_phonons(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phonons", help="harmonic phonons with phonopy",
                       description="Finite-displacement phonons with phonopy (install "
                                   "fastchgnet[phonons]); the forces of all displaced supercells "
                                   "come from one batched model call.")
    _common_args(p)
    p.add_argument("--supercell", type=int, nargs=3, default=[2, 2, 2], metavar=("A", "B", "C"),
                   help="supercell of the given cell [2 2 2]")
    p.add_argument("--displacement", type=float, default=0.01, help="A [%(default)s]")
    p.add_argument("--mesh", type=int, nargs=3, default=[10, 10, 10], metavar=("A", "B", "C"),
                   help="q-point mesh [10 10 10]")
    p.add_argument("--temperatures", type=float, nargs="+", default=None, metavar="T",
                   help="K: thermal properties at these temperatures")
    p.add_argument("--force-constants", action="store_true",
                   help="include the force constants in the JSON record")
    p.set_defaults(func=run_phonons)


def run_phonons(args: argparse.Namespace) -> int:
    from fastchgnet.properties.phonons import import_phonopy, phonons

    try:
        import_phonopy()
    except ImportError as exc:
        print(f"fastchgnet phonons: error: {exc}", file=sys.stderr)
        return 1
    structure, kw = _prepare(args)
    res = phonons(structure, args.model, supercell=args.supercell, displacement=args.displacement,
                  mesh=args.mesh, temperatures=args.temperatures, plot=args.plot,
                  overwrite=args.overwrite, **kw)
    gamma = ", ".join(f"{f:.3f}" for f in res.gamma_frequencies)
    print(text_table(["structure", "atoms", "supercell", "displacements", "Gamma THz",
                      "min THz", "max THz"],
                     [[res.formula, str(res.n_atoms), "x".join(map(str, args.supercell)),
                       str(res.n_displacements), gamma, f"{res.min_frequency:.3f}",
                       f"{np.max(res.mesh['frequencies']):.3f}"]]))
    if res.thermal is not None:
        th = res.thermal
        print(text_table(["T K", "F kJ/mol", "S J/K/mol", "Cv J/K/mol"],
                         [[f"{t:.1f}", f"{f:.4f}", f"{s:.4f}", f"{c:.4f}"] for t, f, s, c in
                          zip(th["temperatures"], th["free_energy"], th["entropy"],
                              th["heat_capacity"])]))
    _write(args, res.to_dict(force_constants=args.force_constants))
    if args.plot:
        print(f"# plot {args.plot}")
    return 0


# ----------------------------------------------------------------------------------------------
# elastic


def add_elastic(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("elastic", help="elastic tensor and moduli",
                       description="Strain the cell by +-0.05 %% and +-0.1 %% in each Voigt "
                                   "component "
                                   "(ions relaxed in each strained cell for cells of more than one "
                                   "atom) and fit the stresses: C_ij in GPa, Voigt/Reuss/Hill "
                                   "moduli.")
    _common_args(p, plot=False)
    p.add_argument("--strains", type=float, nargs="+", default=[-0.001, -0.0005, 0.0005, 0.001],
                   help="strain magnitudes [-0.001 -0.0005 0.0005 0.001]")
    p.add_argument("--no-ion-relax", action="store_true",
                   help="clamped-ion tensor: do not relax the ions in the strained cells")
    p.set_defaults(func=run_elastic)


def run_elastic(args: argparse.Namespace) -> int:
    from fastchgnet.properties.elastic import LABELS, elastic_tensor

    structure, kw = _prepare(args)
    res = elastic_tensor(structure, args.model, strains=args.strains,
                         relax_ions=False if args.no_ion_relax else "auto", **kw)
    print(f"# {res.formula} ({res.n_atoms} atoms), C_ij in GPa "
          f"({'relaxed' if res.relax_ions else 'clamped'} ions)")
    print(text_table(["C"] + list(LABELS),
                     [[LABELS[i]] + [f"{v:.2f}" for v in res.c[i]] for i in range(6)]))
    m = res.moduli
    print(text_table(["modulus GPa", "Voigt", "Reuss", "Hill"],
                     [["bulk K", f"{m['k_voigt']:.2f}", f"{m['k_reuss']:.2f}",
                       f"{m['k_hill']:.2f}"],
                      ["shear G", f"{m['g_voigt']:.2f}", f"{m['g_reuss']:.2f}",
                       f"{m['g_hill']:.2f}"]]))
    _write(args, res.to_dict())
    return 0
