"""MD-step benchmark: one molecular-dynamics step with fastchgnet's ASE calculator against the
reference ``chgnet.model.dynamics.CHGNetCalculator``, side by side (paper Table II).

One step = ``VelocityVerlet.run(1)`` of ASE: the position and momentum updates and one calculator
call on the new geometry (graph construction from the ``Atoms``, the model with energy, forces,
stress and magnetic moments, results back on the host). Both calculators compute the same
properties (``efsm``: chgnet's calculator always does). Each implementation runs its own copy of
the structure, started with the same Maxwell–Boltzmann velocities (300 K); the two are timed
interleaved (ours, ref, ref, ours, ...) after warm-up steps.

Structures: LiMnO2 (8 atoms) and Li9Co7O16 (32 atoms) from the shared CIFs (skipped when absent),
a 32-atom rocksalt NiO cell (2×2×1 conventional, rattled) and a 64-atom diamond Si cell
(2×2×2 conventional, rattled).

Run: ``python -m fastchgnet.bench_md [--device cuda] [--threads 1] [--json PATH]``; from Python
:func:`run_md_bench` and :func:`format_md_table`.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch

from fastchgnet.bench import (
    start_run,
    fmt_or_na,
    load_our_model,
    load_reference,
    quiet,
    resolve_device,
    save_record,
    structures_dir,
    text_table,
    time_interleaved,
    timing_fields,
)

__all__ = ["format_md_table", "main", "md_structures", "md_stepper", "run_md_bench"]


def md_structures() -> dict[str, Any]:
    """``{name: ase.Atoms}`` of the benchmark cases (shared CIFs first when present)."""
    from ase.build import bulk

    out: dict[str, Any] = {}
    folder = structures_dir()
    if folder is not None:
        from pymatgen.core import Structure
        from pymatgen.io.ase import AseAtomsAdaptor

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, file in (("LiMnO2", "mp-18767-LiMnO2.cif"),
                               ("Li9Co7O16", "mp-1175469-Li9Co7O16.cif")):
                out[name] = AseAtomsAdaptor.get_atoms(Structure.from_file(str(folder / file)))
    nio = bulk("NiO", "rocksalt", a=4.17, cubic=True).repeat((2, 2, 1))
    nio.rattle(0.03, seed=1)
    out["NiO-32"] = nio
    si = bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)
    si.rattle(0.03, seed=2)
    out["Si-64"] = si
    return out


def md_stepper(atoms: Any, calc: Any, timestep_fs: float = 1.0, seed: int = 0) -> Callable[[], Any]:
    """A function doing one velocity-Verlet step of a copy of ``atoms`` with ``calc``."""
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    a = atoms.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        MaxwellBoltzmannDistribution(a, temperature_K=300, rng=np.random.default_rng(seed))
    a.calc = calc
    dyn = VelocityVerlet(a, timestep=timestep_fs * units.fs)
    return lambda: dyn.run(1)


def _reference_calculator(device: str) -> Any | None:
    ref = load_reference(device)
    if ref is None:
        return None
    with quiet():
        from chgnet.model.dynamics import CHGNetCalculator as RefCalculator

        return RefCalculator(model=ref, use_device=device)


def run_md_bench(device: str = "cpu", repeats: int = 20, warmup: int = 3, *,
                 reference: bool = True, threads: int | None = None,
                 progress: Callable[[str], None] | None = None) -> list[dict]:
    """Time one MD step per structure, ours and chgnet's; one row per structure.

    Args:
        device: ``cpu``, ``cuda`` or ``auto``.
        repeats: timed steps per implementation (medians reported).
        warmup: untimed steps first.
        reference: also time chgnet's calculator when chgnet is installed.
        threads: torch intra-op threads for the run (restored afterwards).
        progress: called with each case's name before it runs.
    """
    from fastchgnet.md.calculator import CHGNetCalculator

    device = resolve_device(device)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        model, weights = load_our_model(device)
        ours = CHGNetCalculator(model)
        ref = _reference_calculator(device) if reference else None
        rows = []
        for name, atoms in md_structures().items():
            if progress is not None:
                progress(name)
            fns = {"ours": md_stepper(atoms, ours)}
            if ref is not None:
                fns["ref"] = md_stepper(atoms, ref)
            with quiet():
                times = time_interleaved(fns, device, repeats=repeats, warmup=warmup)
            graph = ours.atoms_to_batch(atoms)
            rows.append({"case": name, "device": device, "n_atoms": len(atoms),
                         "n_bonds": 2 * graph.num_bonds, "n_angles": graph.num_angles,
                         **timing_fields(times, repeats, warmup), "weights": weights,
                         "graph": ours.graph_mode, "torch_threads": torch.get_num_threads()})
        return rows
    finally:
        torch.set_num_threads(old_threads)


def format_md_table(rows: list[dict]) -> str:
    """Plain-text table of :func:`run_md_bench` rows."""
    body = [[r["case"], str(r["n_atoms"]), fmt_or_na(r["ours_ms"], ".2f"),
             fmt_or_na(r.get("ref_ms"), ".2f"),
             "n/a" if r.get("ratio") is None else f"{r['ratio']:.2f}x"] for r in rows]
    return text_table(["structure", "atoms", "ours ms/step", "chgnet ms/step", "chgnet/ours"], body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastchgnet.bench_md", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto [%(default)s]")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--no-reference", action="store_true", help="time fastchgnet only")
    p.add_argument("--json", metavar="PATH", help="save environment and rows as JSON")
    args = p.parse_args(argv)
    device, env = start_run(args.device, args.threads)
    t0 = time.perf_counter()
    rows = run_md_bench(device, args.repeats, args.warmup, reference=not args.no_reference,
                        progress=lambda n: print(f"  running {n} ...", file=sys.stderr, flush=True))
    wall = time.perf_counter() - t0
    print(format_md_table(rows))
    print(f"# one velocity-Verlet step (graph + efsm model call + integrator), medians of "
          f"{args.repeats} interleaved steps after {args.warmup} warm-up; total {wall:.1f} s")
    if args.json:
        save_record(args.json, env, {"repeats": args.repeats, "warmup": args.warmup,
                                     "threads": args.threads}, wall, rows)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
