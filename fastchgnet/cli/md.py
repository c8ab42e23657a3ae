"""``fastchgnet relax`` and ``fastchgnet md``: relaxation and molecular dynamics from the shell.

Outputs are named after each input file (:func:`~fastchgnet.cli.common.output_names`: the stem,
with parent folders or the extension only where two inputs would collide) and never replace an
existing file unless ``--overwrite`` is given; the check runs before any work. Progress lines go
to stderr (``--quiet`` turns them off).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fastchgnet.cli.common import (add_model_choice, check_new_files, formula, output_names,
                                   read_structures, text_table)
from fastchgnet.device import resolve_device
from fastchgnet.md.calculator import CHGNetCalculator, as_atoms
from fastchgnet.md.dynamics import MolecularDynamics
from fastchgnet.md.relax import StructOptimizer, quiet_cell_filter_warnings

__all__ = ["add_md", "add_relax"]


def add_model_args(p: argparse.ArgumentParser) -> None:
    add_model_choice(p)
    p.add_argument("--on-isolated-atoms", default="error", choices=["error", "warn", "ignore"],
                   help="atoms without a neighbour within 6 A [%(default)s]")
    p.add_argument("--graph", default="auto", choices=["auto", "host", "device"],
                   help="build graphs on the host or on the model's device with a Verlet skin "
                        "[%(default)s: device on CUDA, host on the CPU]")
    p.add_argument("--compile", default="auto", choices=["auto", "always", "never"],
                   help="compile the model call with torch.compile (Inductor): auto = eager until "
                        "the model calls have taken about one compilation's time (60 s), then "
                        "compiled [%(default)s]")
    p.add_argument("--no-compile", dest="compile", action="store_const", const="never",
                   help="same as --compile never")


def _calculator(args: argparse.Namespace):
    return CHGNetCalculator(args.model, device=resolve_device(args.device),
                            dtype=torch.float64 if args.float64 else None,
                            on_isolated_atoms=args.on_isolated_atoms, graph=args.graph,
                            compile=getattr(args, "compile", "auto"))


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (default: refuse before doing any work)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


RELAX_SUFFIXES = (".cif", ".extxyz", ".traj", ".log")


def write_relaxed(res, stem: Path) -> None:
    """``<stem>.cif`` (pymatgen CIF with the magnetic moments as ``_atom_site_moment`` rows, read
    back by pymatgen as the ``magmom`` site property) and ``<stem>.extxyz`` (the final frame with
    energy, forces, stress and per-atom ``magmoms``, read back by ASE)."""
    import ase.io
    from pymatgen.io.cif import CifWriter

    CifWriter(res.final_structure, write_magmoms=True).write_file(str(stem.with_suffix(".cif")))
    ase.io.write(str(stem.with_suffix(".extxyz")), res.atoms, format="extxyz")


# ----------------------------------------------------------------------------------------------
# relax


def add_relax(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("relax", help="relax structures (positions and cell)",
                       description="Relax each structure with FIRE or BFGS (cell through "
                                   "FrechetCellFilter) until max|F| <= --fmax and max|stress| <= "
                                   "--smax; writes <out>/<name>.cif and .extxyz (the relaxed "
                                   "structure with magmoms), .traj and .log, <name> being the "
                                   "input file's stem (with its parent folder or extension where "
                                   "two inputs would collide).")
    p.add_argument("files", nargs="+", metavar="FILE")
    add_model_args(p)
    p.add_argument("--optimizer", default="FIRE", help="FIRE, BFGS, LBFGS, ... [%(default)s]")
    p.add_argument("--fmax", type=float, default=0.1, help="force criterion, eV/A [%(default)s]")
    p.add_argument("--smax", type=float, default=0.1, help="stress criterion, GPa [%(default)s]")
    p.add_argument("--steps", type=int, default=500, help="maximum optimiser steps [%(default)s]")
    p.add_argument("--pressure", type=float, default=0.0, help="external pressure, GPa [%(default)s]")
    p.add_argument("--no-cell", action="store_true", help="keep the cell fixed")
    p.add_argument("--loginterval", type=int, default=1, help="steps between frames [%(default)s]")
    p.add_argument("--out", default="relaxed", help="output folder [%(default)s]")
    add_output_args(p)
    p.set_defaults(func=run_relax)


def run_relax(args: argparse.Namespace) -> int:
    items = [item for path in args.files for item in read_structures(path)]
    out = Path(args.out)
    stems = [out / name for name in output_names([label for label, _ in items])]
    check_new_files([st.with_suffix(x) for st in stems for x in RELAX_SUFFIXES], args.overwrite)
    opt = StructOptimizer(_calculator(args), args.optimizer)
    out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], 0
    for (label, s), stem in zip(items, stems):
        if not args.quiet:
            print(f"# relaxing {label} ({formula(s)}, {len(s)} atoms) -> {stem}.*", file=sys.stderr,
                  flush=True)
        with quiet_cell_filter_warnings():
            res = opt.relax(s, fmax=args.fmax, smax=args.smax, steps=args.steps,
                            relax_cell=not args.no_cell, pressure=args.pressure,
                            trajectory=stem.with_suffix(".traj"), logfile=stem.with_suffix(".log"),
                            loginterval=args.loginterval, verbose=not args.quiet,
                            overwrite=args.overwrite)
        write_relaxed(res, stem)
        failed += not res.converged
        rows.append([label, formula(s), str(len(s)), "yes" if res.converged else "NO",
                     str(res.steps), f"{res.energy / len(s):.5f}", f"{res.fmax:.4f}",
                     f"{res.smax:.4f}", f"{res.atoms.get_volume():.2f}"])
    print(text_table(["structure", "formula", "atoms", "converged", "steps", "e eV/atom",
                      "max|F| eV/A", "max|s| GPa", "volume A^3"], rows))
    print(f"# relaxed structures (<name>.cif, <name>.extxyz, with magmoms), trajectories and logs "
          f"in {out}/: " + ", ".join(st.name for st in stems))
    _report_compile(opt.calculator)
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# md


def add_md(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("md", help="molecular dynamics of one structure",
                       description="Run NVE, NVT or NPT molecular dynamics; the trajectory "
                                   "<out>/<name>.traj and log <out>/<name>.log (<name>: the input "
                                   "file's stem) are written and flushed every --loginterval "
                                   "steps.")
    p.add_argument("file", metavar="FILE")
    add_model_args(p)
    p.add_argument("--ensemble", default="nvt", choices=["nve", "nvt", "npt"])
    p.add_argument("--thermostat", default=None,
                   help="nvt: langevin (default), nose-hoover, bussi, berendsen; "
                        "npt: mtk (default), mtk-isotropic, berendsen")
    p.add_argument("--temperature", type=float, default=300.0, help="K [%(default)s]")
    p.add_argument("--starting-temperature", type=float, default=None,
                   help="initial Maxwell-Boltzmann temperature, K [--temperature]")
    p.add_argument("--timestep", type=float, default=1.0, help="fs [%(default)s]")
    p.add_argument("--steps", type=int, required=True, help="number of MD steps")
    p.add_argument("--pressure", type=float, default=1.01325e-4, help="GPa [%(default)s]")
    p.add_argument("--taut", type=float, default=None, help="thermostat time, fs [100 x timestep]")
    p.add_argument("--taup", type=float, default=None, help="barostat time, fs [1000 x timestep]")
    p.add_argument("--bulk-modulus", type=float, default=None,
                   help="GPa, Berendsen barostat [estimated with the model]")
    p.add_argument("--supercell", default=None, metavar="A,B,C", help="repeat the cell first")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the initial velocities and stochastic thermostats [random]")
    p.add_argument("--loginterval", type=int, default=1, help="steps between frames [%(default)s]")
    p.add_argument("--trajectory", default=None, help="trajectory file [<out>/<name>.traj]")
    p.add_argument("--logfile", default=None, help="log file [<out>/<name>.log]")
    p.add_argument("--out", default="md", help="output folder [%(default)s]")
    add_output_args(p)
    p.set_defaults(func=run_md)


def run_md(args: argparse.Namespace) -> int:
    frames = read_structures(args.file)
    if len(frames) != 1:
        raise ValueError(f"{args.file} holds {len(frames)} structures; md runs one")
    atoms = as_atoms(frames[0][1])
    if args.supercell:
        reps = [int(x) for x in args.supercell.split(",")]
        if len(reps) != 3 or min(reps) < 1:
            raise ValueError(f"--supercell must be three positive integers, got {args.supercell!r}")
        atoms = atoms.repeat(reps)
    stem = Path(args.out) / output_names([frames[0][0]])[0]
    traj = Path(args.trajectory) if args.trajectory else stem.with_suffix(".traj")
    log = Path(args.logfile) if args.logfile else stem.with_suffix(".log")
    check_new_files([traj, log], args.overwrite)
    start_t = args.starting_temperature if args.starting_temperature is not None else args.temperature
    md = MolecularDynamics(atoms, model=_calculator(args), ensemble=args.ensemble,
                           thermostat=args.thermostat, temperature=args.temperature,
                           starting_temperature=start_t, timestep=args.timestep,
                           pressure=args.pressure, taut=args.taut, taup=args.taup,
                           bulk_modulus=args.bulk_modulus, trajectory=traj, logfile=log,
                           loginterval=args.loginterval, seed=args.seed, verbose=not args.quiet,
                           overwrite=args.overwrite)
    print(f"# {args.ensemble.upper()} ({md.thermostat}) MD of {atoms.get_chemical_formula()} "
          f"({len(atoms)} atoms), {args.steps} steps of {args.timestep} fs; log {log}, "
          f"trajectory {traj}", flush=True)
    t0 = time.perf_counter()
    with md:
        md.run(args.steps)
    dt = time.perf_counter() - t0
    a = md.atoms
    print(f"# done: {dt:.1f} s ({dt / max(args.steps, 1) * 1e3:.1f} ms/step); final T "
          f"{a.get_temperature():.1f} K, Epot {a.get_potential_energy() / len(a):.5f} eV/atom, "
          f"volume {a.get_volume():.2f} A^3")
    _report_compile(md.atoms.calc)
    return 0


def _report_compile(calc) -> None:
    """One line on stderr when the model call was compiled or fell back (nothing for eager)."""
    rep = getattr(calc, "compile_report", None)
    if rep is not None and (rep.compiles or rep.mode != "eager"):
        print(f"# {rep.summary()}", file=sys.stderr, flush=True)
