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
(2×2×2 conventional, rattled); ``--large 2000`` adds a rattled diamond Si supercell of at least
that many atoms.

Our step can also run with a compiled model call (``--variants eager,compiled``: Inductor through
:class:`fastchgnet.compile.CompiledForward`) and, on CUDA, with CUDA-graph replay
(``cudagraph``: :class:`fastchgnet.compile.CUDAGraphForward`); each variant is timed in the
same interleaved rounds as the eager step and chgnet's.

``--max-cell`` instead finds the largest Si supercell whose calculator call (energy, forces,
stress) fits in memory, for ours and for chgnet: atom counts double from ``--max-cell-start``
until a call runs out of memory (CUDA memory capped at ``--memory-gb`` GiB, the paper's 30 GB
setting by default), takes longer than ``--max-cell-seconds``, or passes ``--max-cell-limit``.

Run: ``python -m fastchgnet.bench.md [--device cuda] [--threads 1] [--large 2000]
[--variants eager,compiled,cudagraph] [--max-cell] [--json PATH]``; from Python
:func:`run_md_bench`, :func:`largest_cell` and :func:`format_md_table`.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch
from ase import units
from ase.build import bulk
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

from fastchgnet.bench.common import (
    CIF_LICOO,
    CIF_LIMNO2,
    fmt_or_na,
    int_list,
    is_out_of_memory,
    load_our_model,
    load_reference,
    partial_saver,
    quiet,
    resolve_device,
    save_record,
    start_run,
    structures_dir,
    text_table,
    time_interleaved,
    timing_fields,
)
from fastchgnet.md.calculator import CHGNetCalculator
from fastchgnet.compile import CompiledForward, CUDAGraphForward

__all__ = ["VARIANTS", "format_cell_table", "format_md_table", "largest_cell", "main",
           "md_stepper", "md_structures", "reference_calculator", "run_md_bench", "si_supercell"]

VARIANTS = ("eager", "compiled", "cudagraph")


def si_supercell(min_atoms: int, rattle: float = 0.03, seed: int = 3) -> Any:
    """A rattled diamond Si supercell (``ase.Atoms``) of at least ``min_atoms`` atoms, as close
    to cubic as the 8-atom conventional cell allows."""
    reps = [1, 1, 1]
    while 8 * reps[0] * reps[1] * reps[2] < min_atoms:
        reps[reps.index(min(reps))] += 1
    si = bulk("Si", "diamond", a=5.43, cubic=True).repeat(tuple(sorted(reps)))
    si.rattle(rattle, seed=seed)
    return si


def shared_cif_atoms() -> dict[str, Any]:
    """``{name: ase.Atoms}`` of the shared LiMnO2 and Li9Co7O16 CIFs (empty when absent)."""
    out: dict[str, Any] = {}
    folder = structures_dir()
    if folder is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, file in (("LiMnO2", CIF_LIMNO2), ("Li9Co7O16", CIF_LICOO)):
                out[name] = AseAtomsAdaptor.get_atoms(Structure.from_file(str(folder / file)))
    return out


def md_structures(large: list[int] | None = None) -> dict[str, Any]:
    """``{name: ase.Atoms}`` of the benchmark cases (shared CIFs first when present), plus one
    Si supercell of at least ``n`` atoms per entry of ``large``."""
    out = shared_cif_atoms()
    nio = bulk("NiO", "rocksalt", a=4.17, cubic=True).repeat((2, 2, 1))
    nio.rattle(0.03, seed=1)
    out["NiO-32"] = nio
    out["Si-64"] = si_supercell(64, seed=2)
    for n in large or ():
        big = si_supercell(n)
        out[f"Si-{len(big)}"] = big
    return out


def md_stepper(atoms: Any, calc: Any, timestep_fs: float = 1.0, seed: int = 0) -> Callable[[], Any]:
    """A function doing one velocity-Verlet step of a copy of ``atoms`` with ``calc``."""
    a = atoms.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        MaxwellBoltzmannDistribution(a, temperature_K=300, rng=np.random.default_rng(seed))
    a.calc = calc
    dyn = VelocityVerlet(a, timestep=timestep_fs * units.fs)
    return lambda: dyn.run(1)


def reference_calculator(device: str) -> Any | None:
    """chgnet's ASE calculator with its 0.3.0 model on ``device``, or None without chgnet."""
    ref = load_reference(device)
    if ref is None:
        return None
    with quiet():
        from chgnet.model.dynamics import CHGNetCalculator as RefCalculator

        return RefCalculator(model=ref, use_device=device)


def _our_calculators(model: Any, device: str, variants: tuple[str, ...]) -> dict[str, Any]:
    """``{timing key: calculator}`` of our variants: ``ours`` (eager) always, ``ours_compiled``
    and ``ours_cudagraph`` when asked (CUDA graphs only on CUDA)."""
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown MD-step variants {sorted(unknown)}; use {list(VARIANTS)}")
    calcs = {"ours": CHGNetCalculator(model, compile=False)}
    if "compiled" in variants:
        calcs["ours_compiled"] = CHGNetCalculator(model, forward=CompiledForward(model))
    if "cudagraph" in variants:
        if device.startswith("cuda"):
            calcs["ours_cudagraph"] = CHGNetCalculator(model, forward=CUDAGraphForward(model))
        else:
            print("# cudagraph variant skipped: CUDA graphs need a CUDA device", file=sys.stderr)
    return calcs


def run_md_bench(device: str = "cpu", repeats: int = 20, warmup: int = 3, *,
                 reference: bool = True, threads: int | None = None,
                 progress: Callable[[str], None] | None = None,
                 large: list[int] | None = None,
                 variants: tuple[str, ...] = ("eager",),
                 on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Time one MD step per structure, ours and chgnet's; one row per structure.

    Args:
        device: ``cpu``, ``cuda`` or ``auto``.
        repeats: timed steps per implementation (medians reported).
        warmup: untimed steps first (they include compilation and CUDA-graph capture).
        reference: also time chgnet's calculator when chgnet is installed.
        threads: torch intra-op threads for the run (restored afterwards).
        progress: called with each case's name before it runs.
        large: add a Si supercell of at least this many atoms per entry.
        variants: ours as ``eager`` (always timed) plus ``compiled`` / ``cudagraph``; a row gets
            ``<variant>_ms`` and ``ratio_<variant>`` (chgnet / that variant) for each extra one.
        on_row: called with the rows so far after each structure (e.g. to save partial results).
    """
    device = resolve_device(device)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        model, weights = load_our_model(device)
        ref = reference_calculator(device) if reference else None
        calcs = _our_calculators(model, device, tuple(variants))
        rows = []
        for name, atoms in md_structures(large).items():
            if progress is not None:
                progress(name)
            fns = {key: md_stepper(atoms, calc) for key, calc in calcs.items()}
            if ref is not None:
                fns["ref"] = md_stepper(atoms, ref)
            with quiet():
                times = time_interleaved(fns, device, repeats=repeats, warmup=warmup)
            ours = calcs["ours"]
            graph = ours.atoms_to_batch(atoms)
            row = {"case": name, "device": device, "n_atoms": len(atoms),
                   "n_bonds": 2 * graph.num_bonds, "n_angles": graph.num_angles,
                   **timing_fields(times, repeats, warmup), "weights": weights,
                   "graph": ours.graph_mode, "torch_threads": torch.get_num_threads()}
            for key in calcs:
                if key == "ours":
                    continue
                v = key.split("_", 1)[1]
                ms = statistics.median(times[key])
                row[f"{v}_ms"] = ms
                row[f"{v}_ms_all"] = times[key]
                row[f"ratio_{v}"] = row["ref_ms"] / ms if row["ref_ms"] is not None else None
            rows.append(row)
            if on_row is not None:
                on_row(rows)
            del fns
            gc.collect()
        return rows
    finally:
        torch.set_num_threads(old_threads)


def _release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def largest_cell(device: str = "cuda", *, memory_gb: float | None = 30.0, start: int = 1000,
                 limit: int = 131_072, max_seconds: float = 120.0, reference: bool = True,
                 threads: int | None = None,
                 progress: Callable[[str], None] | None = None,
                 on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """The largest Si supercell each implementation can evaluate (energy, forces, stress).

    Atom counts double from ``start``; an implementation stops at its first out-of-memory error,
    at the first call slower than ``max_seconds``, or past ``limit``. On CUDA the process may use
    at most ``memory_gb`` GiB (``torch.cuda.set_per_process_memory_fraction``; None: the whole
    card). One row per attempt: ``impl`` (ours / ref), ``n_atoms``, ``status`` (ok / oom /
    slow), call time ``s`` and peak CUDA memory ``peak_mib``; ``on_row(rows)`` after each.
    """
    device = resolve_device(device)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    cuda = device.startswith("cuda")
    if cuda and memory_gb is not None:
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_gb * 2**30 / total),
                                                   torch.device(device))
    try:
        model, _ = load_our_model(device)
        calcs: dict[str, Any] = {"ours": CHGNetCalculator(model, task="efs", compile=False)}
        if reference:
            ref = reference_calculator(device)
            if ref is not None:
                calcs["ref"] = ref
        rows: list[dict] = []
        alive = set(calcs)
        n = start
        while alive and n <= limit:
            atoms = si_supercell(n)
            for impl in [k for k in calcs if k in alive]:
                if progress is not None:
                    progress(f"{impl} {len(atoms)} atoms")
                a = atoms.copy()
                calc = calcs[impl]
                calc.reset()
                _release(device)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                try:
                    with quiet():
                        calc.calculate(a, ["energy", "forces", "stress"])
                    if cuda:
                        torch.cuda.synchronize()
                    status = "ok"
                except Exception as exc:  # out of memory ends this implementation's search
                    if not is_out_of_memory(exc):
                        raise
                    status = "oom"
                secs = time.perf_counter() - t0
                if status == "ok" and secs > max_seconds:
                    status = "slow"
                peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
                rows.append({"impl": impl, "n_atoms": len(atoms), "status": status, "s": secs,
                             "peak_mib": peak, "memory_gb": memory_gb if cuda else None})
                calc.reset()
                if on_row is not None:
                    on_row(rows)
                if status != "ok":
                    alive.discard(impl)
                _release(device)
            n *= 2
        return rows
    finally:
        torch.set_num_threads(old_threads)
        if cuda and memory_gb is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, torch.device(device))


def _ratio(v: Any) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def format_md_table(rows: list[dict]) -> str:
    """Plain-text table of :func:`run_md_bench` rows (one column pair per extra variant)."""
    extra = [v for v in VARIANTS[1:] if any(f"{v}_ms" in r for r in rows)]
    head = ["structure", "atoms", "ours ms/step", "chgnet ms/step", "chgnet/ours"]
    for v in extra:
        head += [f"{v} ms/step", f"chgnet/{v}"]
    body = []
    for r in rows:
        line = [r["case"], str(r["n_atoms"]), fmt_or_na(r["ours_ms"], ".2f"),
                fmt_or_na(r.get("ref_ms"), ".2f"), _ratio(r.get("ratio"))]
        for v in extra:
            line += [fmt_or_na(r.get(f"{v}_ms"), ".2f"), _ratio(r.get(f"ratio_{v}"))]
        body.append(line)
    return text_table(head, body)


def format_cell_table(rows: list[dict]) -> str:
    """Plain-text table of :func:`largest_cell` rows, then the largest passing size of each."""
    body = [[r["impl"], str(r["n_atoms"]), r["status"], f"{r['s']:.2f}",
             fmt_or_na(r["peak_mib"], ".0f")] for r in rows]
    table = text_table(["impl", "atoms", "status", "call s", "peak MiB"], body)
    best = {}
    for r in rows:
        if r["status"] == "ok":
            best[r["impl"]] = max(best.get(r["impl"], 0), r["n_atoms"])
    return table + "\n# largest cell: " + ", ".join(f"{k} {v} atoms" for k, v in best.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastchgnet.bench.md", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto [%(default)s]")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--no-reference", action="store_true", help="time fastchgnet only")
    p.add_argument("--large", default=None, metavar="N[,N...]",
                   help="add Si supercells of at least N atoms (e.g. 2000)")
    p.add_argument("--variants", default="eager",
                   help=f"our step variants, comma-separated from {','.join(VARIANTS)} [%(default)s]")
    p.add_argument("--max-cell", action="store_true",
                   help="find the largest cell that fits in memory instead of timing steps")
    p.add_argument("--memory-gb", type=float, default=30.0,
                   help="--max-cell: CUDA memory cap in GiB, 0 for the whole card [%(default)s]")
    p.add_argument("--max-cell-start", type=int, default=1000, help="--max-cell: first atom count")
    p.add_argument("--max-cell-limit", type=int, default=131_072,
                   help="--max-cell: largest atom count tried [%(default)s]")
    p.add_argument("--max-cell-seconds", type=float, default=120.0,
                   help="--max-cell: stop an implementation after a slower call [%(default)s]")
    p.add_argument("--json", metavar="PATH", help="save environment and rows as JSON")
    args = p.parse_args(argv)
    device, env = start_run(args.device, args.threads)
    t0 = time.perf_counter()
    say = lambda n: print(f"  running {n} ...", file=sys.stderr, flush=True)  # noqa: E731
    if args.max_cell:
        settings = {"memory_gb": args.memory_gb or None, "start": args.max_cell_start,
                    "limit": args.max_cell_limit, "max_seconds": args.max_cell_seconds}
        rows = largest_cell(device, reference=not args.no_reference, threads=args.threads,
                            progress=say, on_row=partial_saver(args.json, env, settings, t0),
                            **settings)
        wall = time.perf_counter() - t0
        print(format_cell_table(rows))
        print(f"# one calculator call (energy, forces, stress) per size; total {wall:.1f} s")
    else:
        variants = tuple(v for v in args.variants.split(",") if v)
        settings = {"repeats": args.repeats, "warmup": args.warmup, "threads": args.threads,
                    "large": int_list(args.large), "variants": variants}
        rows = run_md_bench(device, args.repeats, args.warmup, reference=not args.no_reference,
                            progress=say, large=int_list(args.large), variants=variants,
                            on_row=partial_saver(args.json, env, settings, t0))
        wall = time.perf_counter() - t0
        print(format_md_table(rows))
        print(f"# one velocity-Verlet step (graph + efsm model call + integrator), medians of "
              f"{args.repeats} interleaved steps after {args.warmup} warm-up; total {wall:.1f} s")
    if args.json:
        save_record(args.json, env, settings, wall, rows)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
