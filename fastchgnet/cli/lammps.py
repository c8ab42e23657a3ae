"""``fastchgnet lammps``: run a LAMMPS input script with a fastchgnet model as the potential.

Works on one process or under ``mpiexec -n N fastchgnet lammps ...`` (every rank runs this
command; LAMMPS prints from rank 0). The script must not set a pair style; see docs/lammps.md.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from fastchgnet.cli.common import add_model_choice
from fastchgnet.device import resolve_device

__all__ = ["add_lammps", "run_lammps"]


def add_lammps(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lammps", help="run a LAMMPS input script with a fastchgnet model",
                       description="Run a LAMMPS input script (units metal, no pair_style) with "
                                   "the model attached through fix external right after the "
                                   "atoms are created (read_data, read_restart or create_atoms). "
                                   "Under 'mpiexec -n N' every rank runs it.")
    p.add_argument("input", metavar="IN", help="LAMMPS input script")
    p.add_argument("--elements", nargs="+", required=True, metavar="EL",
                   help="element of each atom type, in type order (as in pair_coeff)")
    add_model_choice(p, device_default="cpu")
    p.add_argument("--mode", default="auto", choices=["auto", "replicated", "local"],
                   help="parallel mode over MPI ranks [%(default)s]; see docs/lammps.md")
    p.add_argument("--var", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="set an index variable of the script (repeatable), as lmp -var")
    p.add_argument("--log", default="none", help="LAMMPS log file [%(default)s]")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per MPI rank [torch's default]")
    p.add_argument("--on-isolated-atoms", default="error", choices=["error", "warn", "ignore"],
                   help="atoms without a neighbour within 6 A [%(default)s]")
    p.set_defaults(func=run_lammps)


def run_lammps(args: argparse.Namespace) -> int:
    from fastchgnet.lammps import run_input

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    t0 = time.perf_counter()
    try:
        fix = run_input(args.input, args.model, args.elements, mode=args.mode,
                        device=resolve_device(args.device),
                        dtype=torch.float64 if args.float64 else None,
                        variables=dict(args.var), lammps_args=["-nocite", "-log", args.log],
                        on_isolated_atoms=args.on_isolated_atoms)
    except (ImportError, RuntimeError) as exc:
        print(f"fastchgnet lammps: error: {exc}", file=sys.stderr)
        return 1
    if fix.comm.rank == 0:
        print(f"# fastchgnet lammps: {fix.n_calls} model calls on {fix.comm.size} MPI rank(s), "
              f"mode {fix.mode}, {time.perf_counter() - t0:.1f} s", flush=True)
    return 0
