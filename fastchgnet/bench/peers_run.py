"""The peers' cases and their runner: fastchgnet vs matgl's CHGNet vs ``chgnet`` on the CPU.

Cases (see :mod:`fastchgnet.bench.peers` for the port of the weights):

* ``md step <name>``: one ``VelocityVerlet.run(1)`` step (1 fs) through each package's ASE
  calculator (energy, forces, stress, magmoms; each calculator its own copy of the atoms, with the
  same 300 K velocities) on LiMnO2 (8 atoms) and Li9Co7O16 (32 atoms) from the shared CIFs
  (left out when absent) and rattled diamond Si cells of 64 and 512 atoms;
* ``predict efsm 16x b16``: energy, forces, stress and magmoms of the 16 benchmark structures
  (8–32 atoms) in one batch, end to end (graph construction, batching, model, results);
* ``train efsm b8``: one training step of the exact model at batch 8 (forward with
  ``create_graph``, Huber loss on e/f/s/m, backward, Adam), the graphs built outside the step.

Each case runs the three implementations interleaved round by round (A B C, C B A, ...) after
warm-up rounds, under the requested torch thread count (restored after). A row holds the
medians, ``ratio`` = chgnet / ours and ``ratio_matgl`` = matgl / ours (> 1: fastchgnet faster),
and each package's largest output difference from chgnet (``diff_ours``, ``diff_matgl``; for the
training step the first step's loss of each, ``loss_*``).
"""

from __future__ import annotations

import functools
import gc
import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fastchgnet.bench.common import (
    bench_structures,
    load_our_model,
    load_reference,
    quiet,
    text_table,
)
from fastchgnet.bench.md import md_stepper, shared_cif_atoms, si_supercell
from fastchgnet.bench.peers import (
    Interleaved,
    matgl_calculator,
    matgl_graphs,
    matgl_outputs,
    matgl_potential,
    matgl_train_step,
    max_diffs,
    require_matgl,
    torch_threads,
)
from fastchgnet.bench.train_data import chgnet_like_batch, default_max_atoms
from fastchgnet.bench.train_step import (
    LEARNING_RATE,
    chgnet_inputs,
    chgnet_train_step,
    our_inputs,
    ours_train_step,
    reference_training,
    train_loss,
)
from fastchgnet.compile import compile_callable
from fastchgnet.train.schedule import make_optimizer
from fastchgnet.units import EV_A3_TO_GPA

__all__ = ["CASES", "Peers", "format_peers_table", "md_atoms", "run_peers"]

CASES = ("md", "predict", "train")
MD_SI_SIZES = (64, 512)
TRAIN_BATCH = 8


def md_atoms(si_sizes: Sequence[int] = MD_SI_SIZES) -> dict[str, Any]:
    """``{name: ase.Atoms}``: the shared LiMnO2 and Li9Co7O16 cells when present, then rattled
    diamond Si cells of the given sizes."""
    out = shared_cif_atoms()
    for n in si_sizes:
        si = si_supercell(n, seed=2)
        out[f"Si-{len(si)}"] = si
    return out


class Peers:
    """The three implementations for inference, loaded once: our 0.3.0 model, chgnet's, and
    matgl's CHGNet with the ported weights (a ``Potential`` with stresses and magmoms)."""

    def __init__(self, compile_ours: bool = False) -> None:
        """``compile_ours``: our calculator's model call compiled by Inductor (``compile=True``;
        compiled in the untimed first call of each case, its time kept in the row)."""
        require_matgl()
        self.compile_ours = compile_ours
        self.ours, self.weights = load_our_model("cpu")
        self.ref = load_reference("cpu")
        if self.ref is None:
            raise ImportError("chgnet is not installed (the reference and the weights' source)")
        self.matgl = matgl_potential(self.ref)

    # one MD step ------------------------------------------------------------------------------
    def md_case(self, atoms: Any) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
        from chgnet.model.dynamics import CHGNetCalculator as RefCalculator

        from fastchgnet.md.calculator import CHGNetCalculator

        with quiet():
            calcs = {"ours": CHGNetCalculator(self.ours, compile=self.compile_ours),
                     "matgl": matgl_calculator(self.matgl),
                     "chgnet": RefCalculator(model=self.ref, use_device="cpu")}
            outs = {k: _single_point(atoms, c) for k, c in calcs.items()}
        info = {"n_atoms": len(atoms), "weights": self.weights, "ours_compiled": self.compile_ours,
                **{f"diff_{k}": max_diffs([outs[k]], [outs["chgnet"]]) for k in ("ours", "matgl")}}
        report = calcs["ours"].compile_report
        if self.compile_ours and report is not None:
            info.update(ours_compile_s=report.compile_s, ours_call_mode=report.mode)
        return {k: md_stepper(atoms, c) for k, c in calcs.items()}, info

    # batched prediction -----------------------------------------------------------------------
    def predict_case(self, structures: list) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
        n = len(structures)
        fns = {
            "ours": lambda: self.ours.predict(structures, task="efsm", batch_size=n),
            "matgl": lambda: matgl_outputs(self.matgl, structures),
            "chgnet": lambda: self.ref.predict_structure(structures, task="efsm", batch_size=n),
        }
        with quiet():
            outs = {k: fn() for k, fn in fns.items()}
        info = {"n_atoms": sum(len(s) for s in structures), "n_structures": n,
                "batch_size": n, "weights": self.weights,
                **{f"diff_{k}": max_diffs(outs[k], outs["chgnet"]) for k in ("ours", "matgl")}}
        return fns, info


def _single_point(atoms: Any, calc: Any) -> dict[str, np.ndarray]:
    """``{e (eV/atom), f, s (GPa, Voigt), m}`` of ``calc`` on a copy of ``atoms``."""
    a = atoms.copy()
    a.calc = calc
    e = a.get_potential_energy() / len(a)
    return {"e": e, "f": a.get_forces(), "s": a.get_stress(voigt=True) * EV_A3_TO_GPA,
            "m": np.abs(np.asarray(calc.get_property("magmoms", a)).reshape(-1))}


def train_case(batch_size: int = TRAIN_BATCH, seed: int = 0, compile_ours: bool = False
               ) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """One training step of each implementation on the same batch and labels, each from the
    0.3.0 weights with its AtomRef frozen and its own Adam (lr 1e-3). ``compile_ours``: our
    forward compiled by Inductor (what ``fastchgnet train --compile`` runs; compiled in the
    first, untimed call)."""
    require_matgl()
    data = chgnet_like_batch(batch_size, seed + batch_size, max_atoms=default_max_atoms("cpu"))
    model, weights = load_our_model("cpu")
    model.train()
    opt = make_optimizer(model, LEARNING_RATE)
    batch, targets, counts = our_inputs(data, model, "cpu")
    ref, conv, ref_opt = reference_training("cpu")
    if ref is None:
        raise ImportError("chgnet is not installed (the reference and the weights' source)")
    graphs, labels, _ = chgnet_inputs(data, conv, "cpu")
    pot = matgl_potential(ref, training=True)  # ported before ref's first step
    pot_opt = torch.optim.Adam([p for p in pot.parameters() if p.requires_grad], lr=LEARNING_RATE)
    g, lat = matgl_graphs(data.structures, tuple(pot.model.element_types), pot.model.cutoff)
    n_atoms = torch.tensor([len(s) for s in data.structures], dtype=torch.float32)
    forward = compile_callable(model) if compile_ours else None
    fns = {
        "ours": functools.partial(ours_train_step, model, opt, batch, targets, forward=forward),
        "matgl": functools.partial(matgl_train_step, pot, pot_opt, g, lat, n_atoms, labels,
                                   train_loss),
        "chgnet": functools.partial(chgnet_train_step, ref, ref_opt, graphs, labels),
    }
    info = {"n_atoms": data.n_atoms, "batch_size": batch_size, "weights": weights, **counts,
            "structures": data.source, "ours_compiled": compile_ours}
    return fns, info


# ----------------------------------------------------------------------------------------------
# the run


def _repeats_for(n_atoms: int, repeats: int) -> int:
    """Fewer rounds for the 512-atom cell (chgnet's step takes seconds there), never fewer sizes."""
    return max(3, repeats // 3) if n_atoms >= 256 else repeats


def run_peers(threads: Sequence[int] = (1, 2), cases: Sequence[str] = CASES, repeats: int = 7,
              warmup: int = 1, *, si_sizes: Sequence[int] = MD_SI_SIZES,
              progress: Callable[[str], None] | None = None,
              on_row: Callable[[list[dict]], None] | None = None,
              compile_ours: bool = False) -> list[dict]:
    """One row per (case, thread count); see the module docstring. ``compile_ours``: our MD
    calculator compiled (see :class:`Peers`) and our training forward compiled
    (:func:`train_case`)."""
    unknown = set(cases) - set(CASES)
    if unknown:
        raise ValueError(f"unknown cases {sorted(unknown)}; use {list(CASES)}")
    peers = Peers(compile_ours)
    structures = bench_structures()
    rows: list[dict] = []

    def measure(name: str, t: int, build: Callable[[], tuple[dict, dict]], n_rep: int) -> None:
        if progress is not None:
            progress(f"{name} ({t} thread{'s' if t > 1 else ''})")
        with torch_threads(t), quiet():
            fns, info = build()
            if name.startswith("train"):  # the first step's loss of each (before any update)
                for k, fn in fns.items():  # and its time (ours compiled: the compilation)
                    t0 = time.perf_counter()
                    info[f"loss_{k}"] = float(fn())
                    info[f"first_step_s_{k}"] = time.perf_counter() - t0
            timer = Interleaved(fns)
            timer.run(n_rep, warmup)
        rows.append({"case": name, "threads": t, **info, **timer.summary(),
                     "warmup": warmup, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")})
        if on_row is not None:
            on_row(rows)
        del fns, timer
        gc.collect()

    for t in threads:
        if "md" in cases:
            for name, atoms in md_atoms(si_sizes).items():
                label = f"md step {name}" + (" (ours compiled)" if compile_ours else "")
                measure(label, t, functools.partial(peers.md_case, atoms),
                        _repeats_for(len(atoms), repeats))
        if "predict" in cases:
            measure(f"predict efsm {len(structures.batch)}x b{len(structures.batch)}", t,
                    functools.partial(peers.predict_case, structures.batch), repeats)
        if "train" in cases:
            measure(f"train efsm b{TRAIN_BATCH}" + (" (ours compiled)" if compile_ours else ""),
                    t, functools.partial(train_case, compile_ours=compile_ours), repeats)
    return rows


def _x(v: Any) -> str:
    return f"{v:.2f}x" if isinstance(v, (int, float)) else "n/a"


def format_peers_table(rows: list[dict]) -> str:
    head = ["case", "threads", "atoms", "ours ms", "matgl ms", "chgnet ms", "vs matgl",
            "vs chgnet", "min: vs matgl", "vs chgnet", "matgl Δe eV/at", "ours Δe eV/at"]
    body = []
    for r in rows:
        dm, do = r.get("diff_matgl") or {}, r.get("diff_ours") or {}
        body.append([r["case"], str(r["threads"]), str(r["n_atoms"]),
                     f"{r['ours_ms']:.1f}", f"{r['matgl_ms']:.1f}", f"{r['chgnet_ms']:.1f}",
                     _x(r["ratio_matgl"]), _x(r["ratio"]), _x(r.get("ratio_matgl_min")),
                     _x(r.get("ratio_chgnet_min")),
                     f"{dm['e']:.3g}" if dm else "-", f"{do['e']:.1e}" if do else "-"])
    return text_table(head, body)
