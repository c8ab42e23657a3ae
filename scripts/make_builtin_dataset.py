#!/usr/bin/env python
"""Generate fastchgnet's built-in training dataset (``fastchgnet/assets/builtin_dataset.npz``).

About 2,000 varied crystals (1 to 64 atoms, 60+ elements), labelled with the reference CHGNet 0.3.0
(the ``chgnet`` package): energy per atom, forces, stress and magnetic moments. The labels are
*distilled from CHGNet 0.3.0, not DFT*: the dataset is for demos, smoke tests and benchmarks of
``fastchgnet train``, not for scientific fitting. See ``docs/builtin_dataset.md``.

Two kinds of structure, all drawn from one seeded random generator:

* prototype crystals (``fastchgnet.data.prototypes``): a random prototype with random elements from
  its element pools, sometimes reduced to its primitive cell, a random strain (isotropic -5..+8 %
  plus a symmetric shear/deviatoric part up to ±4 %), a random supercell up to 64 atoms, in 30 %
  of them a random substitution (1 to 25 % of one element's sites replaced by another element of
  the same kind: anion, cation or metal), and a Gaussian rattle (σ up to 0.12 Å; none in 10 %);
* short molecular-dynamics snapshots: a few frames, 20 fs apart, from ASE Langevin runs at
  300-1500 K driven by CHGNet 0.3.0 (``chgnet.model.dynamics.CHGNetCalculator``).

Every candidate is labelled by ``CHGNet.predict_graph`` (task "efsm") and rejected when its graph
cannot be built (isolated atoms, atoms closer than 0.5 Å: checked by chgnet and by fastchgnet's
``build_graph``) or when a prediction is non-finite or absurd (|e| > 20 eV/atom, max |F| > 50 eV/Å,
max |s| > 300 GPa). Prototype candidates are drawn until the quota is met, so the dataset has
exactly ``--n`` structures unless MD frames are rejected.

Usage (the committed file)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/make_builtin_dataset.py --n 2000 --seed 0 --threads 1
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "fastchgnet" / "assets" / "builtin_dataset.npz"
MAX_ATOMS = 64
# rejection limits ("absurd" predictions)
MAX_ABS_E = 20.0  # eV/atom
MAX_ABS_F = 50.0  # eV/Å
MAX_ABS_S = 300.0  # GPa
# prototype sampling weights (diamond has only 4 elements, simple cubic is 1 atom: fewer of them)
PROTO_WEIGHTS = {
    "rocksalt": 1.0, "cscl": 1.0, "zincblende": 1.0, "fluorite": 1.0, "perovskite": 1.3,
    "rutile": 1.0, "wurtzite": 1.0, "layered": 1.2, "l12": 1.0, "bcc": 0.8, "fcc": 0.8,
    "hcp": 0.8, "diamond": 0.35, "simple_cubic": 0.4,
}
MD_TEMPERATURES = (300, 600, 900, 1200, 1500)  # K
MD_TIMESTEP_FS = 1.0
MD_FRAME_EVERY = 20  # steps (20 fs between frames)
MD_FRAMES = 5  # per run, at 20, 40, ..., 100 fs
MD_FRACTION = 0.01  # MD runs per requested structure (2000 -> 20 runs -> 100 frames)


# ------------------------------------------------------------------------------------------------
# structures


def _pick_elements(rng: np.random.Generator, pools: tuple[tuple[str, ...], ...]) -> list[str]:
    els: list[str] = []
    for pool in pools:
        choices = [e for e in pool if e not in els] or list(pool)
        els.append(str(rng.choice(choices)))
    return els


def _random_strain(rng: np.random.Generator, iso: tuple[float, float], dev: float) -> np.ndarray:
    eps = rng.uniform(-dev, dev, (3, 3))
    eps = (eps + eps.T) / 2
    eps -= np.trace(eps) / 3 * np.eye(3)
    return eps + rng.uniform(*iso) * np.eye(3)


def _random_reps(rng: np.random.Generator, n0: int, cap: int) -> list[int]:
    reps = [1, 1, 1]
    while True:
        k = int(rng.integers(3))
        if n0 * np.prod(reps) * (reps[k] + 1) // reps[k] > cap:
            # try the other axes once before stopping
            grown = False
            for k2 in rng.permutation(3):
                if n0 * np.prod(reps) * (reps[k2] + 1) // reps[k2] <= cap and rng.random() < 0.5:
                    reps[k2] += 1
                    grown = True
                    break
            if not grown:
                return reps
        else:
            reps[k] += 1


def _substitute(rng: np.random.Generator, s, max_frac: float = 0.25):
    """Dope one sublattice: replace 1 to ``max_frac`` of the sites of one element by another
    element of the same kind (anion, cation or metal pool)."""
    from fastchgnet.data.prototypes import ANIONS, CATIONS, METALS

    symbols = [site.specie.symbol for site in s]
    host = str(rng.choice(sorted(set(symbols))))
    sites = [i for i, x in enumerate(symbols) if x == host]
    pool = ANIONS if host in ANIONS else CATIONS if host in CATIONS else METALS
    dopant = str(rng.choice([e for e in pool if e not in symbols]))
    k = int(rng.integers(1, max(1, int(len(sites) * max_frac)) + 1))
    for i in sorted(int(x) for x in rng.choice(sites, size=k, replace=False)):
        s.replace(i, dopant)
    return s


def formula(s) -> str:
    """Reduced formula without brackets (for ids): 'SrTiO3', 'Li2Fe3O4'."""
    f = s.composition.reduced_formula
    if "(" in f:
        f = s.composition.reduced_composition.formula.replace(" ", "")
    return f


def prototype_candidate(rng: np.random.Generator, *, min_atoms: int = 1, max_atoms: int = MAX_ATOMS,
                        rattle_max: float = 0.12, substitution_p: float = 0.3,
                        strain_iso: tuple[float, float] = (-0.05, 0.08), strain_dev: float = 0.04):
    """(structure, prototype name) or None when the drawn cell is out of the size range."""
    from pymatgen.core import Structure

    from fastchgnet.data.prototypes import PROTOTYPES, make

    names = sorted(PROTOTYPES)
    w = np.array([PROTO_WEIGHTS.get(k, 1.0) for k in names])
    name = names[int(rng.choice(len(names), p=w / w.sum()))]
    els = _pick_elements(rng, PROTOTYPES[name][1])
    eps = _random_strain(rng, strain_iso, strain_dev)
    primitive = rng.random() < 0.3
    if primitive:
        s = make(name, els).get_primitive_structure()
        s = Structure(s.lattice.matrix @ (np.eye(3) + eps), s.species, s.frac_coords)
    else:
        s = make(name, els, strain=eps)
    n0 = len(s)
    if n0 > max_atoms:
        return None
    u = rng.random()
    cap = max_atoms if u < 0.35 else 32 if u < 0.65 else 16 if u < 0.85 else n0
    reps = _random_reps(rng, n0, max(cap, n0))
    s.make_supercell(reps)
    if len(s) < min_atoms or len(s) > max_atoms:
        return None
    if rng.random() < substitution_p:
        s = _substitute(rng, s)
    sigma = 0.0 if rng.random() < 0.1 else float(rng.uniform(0.005, rattle_max))
    if sigma:
        s = Structure(s.lattice, s.species, s.cart_coords + rng.normal(0, sigma, (len(s), 3)),
                      coords_are_cartesian=True)
    return s, name


# ------------------------------------------------------------------------------------------------
# labelling


def _quiet():
    """Silence chgnet's prints (isolated-atom messages etc.) and warnings."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def label(model, structures: list, batch_size: int) -> tuple[list, list]:
    """CHGNet 0.3.0 labels ``(e, f, s, m)`` for each structure, or None when it is rejected, and
    the reason of each rejection (None for a kept structure)."""
    from fastchgnet.data.graph import build_graph

    reasons: list = [None] * len(structures)
    out: list = [None] * len(structures)
    graphs, where = [], []
    for i, s in enumerate(structures):
        try:
            build_graph(s)  # fastchgnet's rules: min distance 0.5 Å, no isolated atoms
        except ValueError:
            reasons[i] = "graph (fastchgnet)"
            continue
        try:
            with _quiet():
                g = model.graph_converter(s, graph_id=str(i))
        except Exception:  # isolated atoms (ValueError) or a bond-graph failure (RuntimeError)
            reasons[i] = "graph (chgnet)"
            continue
        graphs.append(g)
        where.append(i)
    if graphs:
        with _quiet():
            preds = model.predict_graph(graphs, task="efsm", batch_size=batch_size)
        if isinstance(preds, dict):
            preds = [preds]
        for i, p in zip(where, preds):
            e = float(np.asarray(p["e"]).reshape(()))
            f, st, m = (np.asarray(p[k], dtype=np.float64) for k in ("f", "s", "m"))
            m = m.reshape(-1)
            if not (np.isfinite(e) and np.isfinite(f).all() and np.isfinite(st).all()
                    and np.isfinite(m).all()):
                reasons[i] = "non-finite prediction"
            elif abs(e) > MAX_ABS_E:
                reasons[i] = f"|e| > {MAX_ABS_E:g} eV/atom"
            elif f.size and np.abs(f).max() > MAX_ABS_F:
                reasons[i] = f"max |F| > {MAX_ABS_F:g} eV/A"
            elif np.abs(st).max() > MAX_ABS_S:
                reasons[i] = f"max |s| > {MAX_ABS_S:g} GPa"
            else:
                out[i] = (e, f, st, m)
    return out, reasons


# ------------------------------------------------------------------------------------------------
# molecular dynamics


def md_frames(model, structure, temperature: float, seed: int) -> list:
    """``MD_FRAMES`` snapshots (pymatgen structures) of a Langevin run driven by CHGNet 0.3.0."""
    from ase import Atoms, units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from chgnet.model.dynamics import CHGNetCalculator
    from pymatgen.core import Lattice, Structure

    atoms = Atoms(numbers=[sp.Z for sp in structure.species], positions=structure.cart_coords,
                  cell=structure.lattice.matrix, pbc=True)
    rng = np.random.default_rng(seed)
    frames = []
    with _quiet():
        atoms.calc = CHGNetCalculator(model, use_device="cpu", on_isolated_atoms="ignore")
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
        Stationary(atoms)
        atoms.set_constraint(FixCom())
        dyn = Langevin(atoms, timestep=MD_TIMESTEP_FS * units.fs, temperature_K=temperature,
                       friction=0.02 / units.fs, fixcm=False, rng=rng)
        for _ in range(MD_FRAMES):
            dyn.run(MD_FRAME_EVERY)
            pos = atoms.get_positions()
            if not np.isfinite(pos).all():
                break
            frames.append(Structure(Lattice(np.array(atoms.cell[:])), list(atoms.numbers), pos,
                                    coords_are_cartesian=True))
    return frames


# ------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="number of structures (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output .npz (default {DEFAULT_OUT})")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--batch-size", type=int, default=16, help="chgnet prediction batch size")
    ap.add_argument("--md-runs", type=int, default=None,
                    help=f"number of MD runs ({MD_FRAMES} frames each; default n/100)")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be >= 1")

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import chgnet
    from chgnet.model import CHGNet

    t_start = time.perf_counter()
    with _quiet():
        model = CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False)
    model.eval()
    rng = np.random.default_rng(args.seed)
    rejected: Counter = Counter()

    # --- MD snapshots
    n_md_runs = args.md_runs if args.md_runs is not None else max(1, round(args.n * MD_FRACTION))
    n_md_runs = min(n_md_runs, args.n // MD_FRAMES)
    md_structs, md_names = [], []
    t0 = time.perf_counter()
    for run in range(n_md_runs):
        while True:  # a small, unrattled starting crystal (8-32 atoms)
            cand = prototype_candidate(rng, min_atoms=8, max_atoms=32, rattle_max=0.02,
                                       substitution_p=0.0, strain_iso=(-0.01, 0.03),
                                       strain_dev=0.01)
            if cand is not None:
                break
        start, proto = cand
        temp = int(MD_TEMPERATURES[run % len(MD_TEMPERATURES)])
        try:
            frames = md_frames(model, start, temp, int(rng.integers(1 << 31)))
        except Exception as exc:  # a failed run only loses its frames
            print(f"  MD run {run} ({start.composition.reduced_formula}, {temp} K) failed: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
            frames = []
        if len(frames) < MD_FRAMES:
            rejected["MD frame: run failed"] += MD_FRAMES - len(frames)
        for k, fr in enumerate(frames):
            md_structs.append(fr)
            md_names.append(f"md{temp}K-{proto}-{formula(fr)}"
                            f"-t{(k + 1) * MD_FRAME_EVERY * MD_TIMESTEP_FS:03.0f}fs")
    md_labels, why = label(model, md_structs, args.batch_size)
    rejected.update(f"MD frame: {r}" for r in why if r is not None)
    md = [(s, n, lab) for s, n, lab in zip(md_structs, md_names, md_labels) if lab is not None]
    t_md = time.perf_counter() - t0
    print(f"MD: {n_md_runs} runs, {len(md)} frames kept ({t_md:.1f} s)", flush=True)

    # --- prototype crystals, drawn in chunks until the quota is met
    quota = args.n - len(md)
    static: list = []
    n_candidates = 0
    t0 = time.perf_counter()
    while len(static) < quota:
        chunk, names = [], []
        want = min(128, int(1.1 * (quota - len(static))) + 4)
        while len(chunk) < want:
            cand = prototype_candidate(rng)
            if cand is None:
                continue
            chunk.append(cand[0])
            names.append(f"{cand[1]}-{formula(cand[0])}")
        n_candidates += len(chunk)
        labels, why = label(model, chunk, args.batch_size)
        for s, n, lab, reason in zip(chunk, names, labels, why):
            if len(static) >= quota:  # candidates past the quota are neither kept nor counted
                n_candidates -= 1
            elif lab is not None:
                static.append((s, n, lab))
            else:
                rejected[reason] += 1
        print(f"  prototypes: {len(static)}/{quota} ({time.perf_counter() - t0:.0f} s)", flush=True)
    t_static = time.perf_counter() - t0

    # --- arrays
    records = static + md
    z_list, pos_list, lat_list, ptr = [], [], [], [0]
    e_arr, f_list, s_arr, m_list, ids, protos = [], [], [], [], [], []
    for i, (s, name, (e, f, st, m)) in enumerate(records):
        z_list.append(np.array([sp.Z for sp in s.species], dtype=np.int16))
        pos_list.append(np.asarray(s.cart_coords, dtype=np.float64))
        lat_list.append(np.asarray(s.lattice.matrix, dtype=np.float64))
        ptr.append(ptr[-1] + len(s))
        e_arr.append(e)
        f_list.append(f.astype(np.float32))
        s_arr.append(st.astype(np.float32))
        m_list.append(m.astype(np.float32))
        ids.append(f"builtin-{i:05d}-{name}")
        protos.append(name.split("-")[0])
    z = np.concatenate(z_list)
    z = z.astype(np.int8) if z.max() < 128 else z
    n_atoms = np.diff(ptr)
    elements = sorted({int(x) for x in z})
    from pymatgen.core import Element

    proto_counts = Counter(p if not p.startswith("md") else "md" for p in protos)
    meta = {
        "name": "fastchgnet built-in dataset",
        "description": "Varied prototype crystals and short MD snapshots; labels are distilled "
                       "from CHGNet 0.3.0, not DFT. For demos, smoke tests and benchmarks, not "
                       "for scientific fitting.",
        "note": "labels are distilled from CHGNet 0.3.0, not DFT",
        "script": "scripts/make_builtin_dataset.py",
        "command": f"scripts/make_builtin_dataset.py --n {args.n} --seed {args.seed} "
                   f"--threads {args.threads} --batch-size {args.batch_size}"
                   + (f" --md-runs {args.md_runs}" if args.md_runs is not None else ""),
        "seed": args.seed,
        "chgnet_version": chgnet.__version__,
        "model_version": "0.3.0",
        "torch_version": torch.__version__,
        "torch_threads": args.threads,
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "units": {"energy_per_atom": "eV/atom", "forces": "eV/Angstrom",
                  "stress": "GPa, CHGNet/ASE sign (positive = tensile)",
                  "magmom": "Bohr magneton (magnitudes, CHGNet 'm')",
                  "positions": "Angstrom, Cartesian", "lattice": "Angstrom, rows are vectors"},
        "n_structures": len(records),
        "n_atoms": int(ptr[-1]),
        "n_elements": len(elements),
        "elements": [Element.from_Z(x).symbol for x in elements],
        "atoms_per_structure": {"min": int(n_atoms.min()), "max": int(n_atoms.max()),
                                "mean": round(float(n_atoms.mean()), 2),
                                "median": float(np.median(n_atoms))},
        "per_prototype": dict(sorted(proto_counts.items())),
        "md": {"runs": n_md_runs, "frames": len(md), "temperatures_K": list(MD_TEMPERATURES),
               "timestep_fs": MD_TIMESTEP_FS, "frame_interval_fs": MD_FRAME_EVERY * MD_TIMESTEP_FS,
               "thermostat": "ASE Langevin, friction 0.02/fs, CHGNetCalculator (CHGNet 0.3.0)"},
        "candidates_prototype": n_candidates,
        "rejected": dict(rejected),
        "rejected_total": int(sum(rejected.values())),
        "rejection_limits": {"abs_e_eV_per_atom": MAX_ABS_E, "max_abs_f_eV_per_A": MAX_ABS_F,
                             "max_abs_s_GPa": MAX_ABS_S, "min_distance_A": 0.5,
                             "isolated_atoms": "rejected (atom cutoff 6 A)"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        atomic_numbers=z,
        positions=np.concatenate(pos_list),
        lattice=np.stack(lat_list),
        atom_ptr=np.asarray(ptr, dtype=np.int64),
        energy_per_atom=np.asarray(e_arr, dtype=np.float64),
        forces=np.concatenate(f_list).astype(np.float32),
        stress=np.stack(s_arr).astype(np.float32),
        magmom=np.concatenate(m_list).astype(np.float32),
        ids=np.asarray(ids, dtype=str),
        meta=np.asarray(json.dumps(meta, indent=1)),
    )
    elapsed = time.perf_counter() - t_start
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)")
    print(f"  structures: {len(records)} ({len(static)} prototype, {len(md)} MD frames)")
    print(f"  atoms: {ptr[-1]} (per structure: min {n_atoms.min()}, median "
          f"{np.median(n_atoms):g}, mean {n_atoms.mean():.1f}, max {n_atoms.max()})")
    print(f"  elements: {len(elements)}")
    print(f"  per prototype: {dict(sorted(proto_counts.items()))}")
    print(f"  rejected: {sum(rejected.values())} {dict(rejected)} "
          f"(of {n_candidates} prototype candidates and {len(md_structs)} MD frames)")
    e = np.asarray(e_arr)
    print(f"  energy/atom: {e.min():.3f} .. {e.max():.3f} eV/atom; max |F| "
          f"{max(float(np.abs(f).max()) for f in f_list):.2f} eV/A; max |s| "
          f"{max(float(np.abs(s).max()) for s in s_arr):.1f} GPa")
    print(f"  time: {elapsed:.1f} s (MD {t_md:.1f} s, prototypes {t_static:.1f} s, "
          f"{args.threads} thread(s))")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
