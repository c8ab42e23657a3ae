"""Peak tensor memory of a training step and of an MD step, fastchgnet against ``chgnet``, on any
device, the CPU included.

On CUDA, ``torch.cuda.max_memory_allocated`` gives the peak. The CPU allocator keeps no such
statistic, so :class:`TensorMemoryTracker` counts it at the dispatcher: every tensor storage that
an operator creates while the tracker is active adds its bytes, and the storage's release
subtracts them (a weak reference to the storage, which lives exactly as long as the memory).
The peak of that sum is the most tensor memory the call held at once, beyond what existed before
it: the weights, the Adam moments and the input batch are not counted. The backward runs in the
calling thread on the CPU and is counted too.

This is the quantity ``max_memory_allocated`` measures on a GPU, minus the allocator's rounding
and fragmentation and minus library workspaces (cuBLAS, cuDNN). Tensors that a library creates
outside the dispatcher (``torch.from_numpy`` of a numpy array, e.g. chgnet's graph arrays) are
not counted either. Use it for ratios between implementations and for how memory grows with
size, not as a prediction of ``nvidia-smi``.

Run: ``python -m fastchgnet.bench.memory --train-batch-sizes 16,32,64 --md-atoms 512,1000,2000``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import subprocess
import sys
import time
import weakref
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from fastchgnet.bench.common import (
    environment,
    fmt_or_na,
    is_out_of_memory,
    load_our_model,
    partial_saver,
    save_record,
    text_table,
)
from fastchgnet.bench.md import reference_calculator, si_supercell
from fastchgnet.bench.train_data import chgnet_like_batch
from fastchgnet.bench.train_step import (
    LEARNING_RATE,
    chgnet_inputs,
    chgnet_train_step,
    our_inputs,
    ours_train_step,
    reference_training,
    variant_steps,
)
from fastchgnet.md.calculator import CHGNetCalculator
from fastchgnet.train.schedule import make_optimizer

__all__ = ["TensorMemoryTracker", "largest_fit", "limit_memory", "main", "md_memory", "measure",
           "peak_tensor_mib", "train_memory"]

MIB = 2**20


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created inside the ``with`` block.

    ``tracker.peak`` (bytes) is the maximum of the live sum; ``tracker.live`` the bytes still
    held at the end. Storages shared by views count once.
    """

    def __init__(self) -> None:
        super().__init__()
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.live = 0
        self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            if st in self._seen:
                continue
            n = st.nbytes()
            self._seen[st] = n
            weakref.finalize(st, self._release, n)
            self.live += n
            if self.live > self.peak:
                self.peak = self.live
        return out


def peak_tensor_mib(fn: Callable[[], Any]) -> float:
    """Peak tensor memory (MiB) that one call of ``fn`` allocated beyond what existed before."""
    with TensorMemoryTracker() as tracker:
        fn()
    return tracker.peak / MIB


def measure(fn: Callable[[], Any]) -> float | None:
    """:func:`peak_tensor_mib` after one untracked warm-up call; None when either call runs out
    of memory (under ``--memory-limit-gb`` an allocation fails instead of the process being
    killed)."""
    try:
        fn()
        return peak_tensor_mib(fn)
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        return None
    finally:
        gc.collect()


def limit_memory(gb: float) -> None:
    """Cap this process's address space at ``gb`` GiB (``RLIMIT_AS``), so that an allocation
    past it raises instead of waking the kernel's OOM killer. Irreversible for the process."""
    import resource  # POSIX only: imported here so that the module still imports elsewhere

    # glibc raises its mmap threshold after each large free, so later large tensors land in the
    # heap, which does not shrink: the address space of one step that ran out would stay
    # reserved. A fixed threshold keeps every tensor above 128 KiB in its own mapping.
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: the cap still applies
        pass
    cap = int(gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))


# ----------------------------------------------------------------------------------------------
# training step


def train_memory(batch_sizes: Sequence[int] = (16, 32, 64), *, models: Sequence[str] = ("exact", "heads"),
                 reference: bool = True, max_atoms: int = 64, seed: int = 0, isolate: bool = False,
                 memory_limit_gb: float | None = None,
                 progress: Callable[[str], None] | None = None,
                 on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Peak tensor MiB of one training step (energy, forces, stress, magmoms; loss; backward;
    Adam) at each batch size, on the CPU, after one untracked step (Adam's moments exist).

    The steps and batches are those of :mod:`fastchgnet.bench.train_step`: MPtrj-like cells of up to
    ``max_atoms`` atoms, all models from the 0.3.0 weights. Row fields: ``batch_size``,
    ``atoms``/``bonds``/``angles``, ``<model>_mib`` for each of ``models``, ``ref_mib`` and
    ``ref_over_<model>`` (> 1: fastchgnet needs less); a value is None when that step ran out of
    memory (see :func:`limit_memory`).

    ``isolate``: each (batch size, implementation) in a fresh process (``memory_limit_gb`` caps
    each). A step that ran out of memory can leave address space reserved in its process, which
    would make every later measurement there fail or read high.
    """
    if isolate:
        impls = list(models) + (["ref"] if reference else [])
        rows = []
        for bs in batch_sizes:
            row: dict[str, Any] = {"batch_size": int(bs)}
            for impl in impls:
                if progress is not None:
                    progress(f"train b{bs} {impl} (own process)")
                one = _isolated(f"train:{bs}:{impl}", max_atoms=max_atoms, seed=seed,
                                memory_limit_gb=memory_limit_gb)
                row.update({k: v for k, v in (one or {}).items() if not k.endswith("_mib")})
                row[f"{impl}_mib"] = (one or {}).get(f"{impl}_mib")
            _finish_row(rows, row, models, on_row)
        return rows
    device = "cpu"
    exact, _ = load_our_model(device)
    exact.train()
    steps: dict[str, Callable[[Any, dict], torch.Tensor]] = {}
    if "exact" in models:
        opt = make_optimizer(exact, LEARNING_RATE)
        steps["exact"] = lambda b, y: ours_train_step(exact, opt, b, y)
    steps.update(variant_steps(exact, [m for m in models if m != "exact"]))
    ref, conv, ref_opt = reference_training(device, reference)
    rows: list[dict] = []
    for bs in batch_sizes:
        data = chgnet_like_batch(int(bs), seed + int(bs), max_atoms=max_atoms)
        batch, labels, counts = our_inputs(data, exact, device)
        row: dict[str, Any] = {"batch_size": int(bs), **counts}
        for name, step in steps.items():
            if progress is not None:
                progress(f"train b{bs} {name}")
            # after a warm-up step: Adam's moments, lazy buffers
            row[f"{name}_mib"] = measure(lambda: step(batch, labels))
        if ref is not None:
            graphs, ref_labels, _ = chgnet_inputs(data, conv, device)
            if progress is not None:
                progress(f"train b{bs} chgnet")
            row["ref_mib"] = measure(lambda: chgnet_train_step(ref, ref_opt, graphs, ref_labels))
            del graphs
        _finish_row(rows, row, list(steps), on_row)
    return rows


# ----------------------------------------------------------------------------------------------
# MD step (energy, forces, stress of one cell)


def md_memory(n_atoms: Sequence[int] = (512, 1000, 2000), *, reference: bool = True, ours: bool = True,
              isolate: bool = False, memory_limit_gb: float | None = None,
              progress: Callable[[str], None] | None = None,
              on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Peak tensor MiB of one energy/forces/stress evaluation of a rattled Si supercell of at
    least ``n`` atoms, through each ASE calculator (ours builds the graph with torch ops, which
    are counted; chgnet builds it in numpy/Cython, which is not). ``isolate`` as in
    :func:`train_memory`."""
    if isolate:
        impls = (["ours"] if ours else []) + (["ref"] if reference else [])
        rows = []
        for n in n_atoms:
            row: dict[str, Any] = {}
            for impl in impls:
                if progress is not None:
                    progress(f"md {n} atoms {impl} (own process)")
                one = _isolated(f"md:{n}:{impl}", memory_limit_gb=memory_limit_gb)
                row.update(one or {"n_atoms": int(n)})
                row.setdefault(f"{impl}_mib", None)
            _finish_row(rows, row, ["ours"] if ours else [], on_row)
        return rows
    calcs: dict[str, Any] = {}
    if ours:
        model, _ = load_our_model("cpu")
        calcs["ours"] = CHGNetCalculator(model, task="efs", compile=False)
    if reference:
        ref = reference_calculator("cpu")
        if ref is not None:
            calcs["ref"] = ref
    rows: list[dict] = []
    for n in n_atoms:
        atoms = si_supercell(int(n))
        row: dict[str, Any] = {"n_atoms": len(atoms)}
        for name, calc in calcs.items():
            if progress is not None:
                progress(f"md {len(atoms)} atoms {name}")

            def call(calc=calc) -> None:
                calc.reset()  # no cached results: a full evaluation every call
                a = atoms.copy()
                a.calc = calc
                a.get_forces()
                a.get_stress()

            row[f"{name}_mib"] = measure(call)
        _finish_row(rows, row, ["ours"] if ours else [], on_row)
    return rows


def _isolated(spec: str, *, max_atoms: int = 64, seed: int = 0,
              memory_limit_gb: float | None = None) -> dict | None:
    """Run one measurement (``train:<batch>:<impl>`` or ``md:<atoms>:<impl>``) in a fresh
    process; its row, or None when the process was killed (the kernel's OOM killer)."""
    cmd = [sys.executable, "-m", "fastchgnet.bench.memory", "--one", spec, "--max-atoms", str(max_atoms),
           "--seed", str(seed), "--threads", str(torch.get_num_threads())]
    if memory_limit_gb:
        cmd += ["--memory-limit-gb", str(memory_limit_gb)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode < 0:  # killed by a signal
        return None
    if res.returncode != 0:
        raise RuntimeError(f"memory measurement {spec} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _one(spec: str, max_atoms: int, seed: int) -> dict:
    kind, size, impl = spec.split(":")
    if kind == "train":
        rows = train_memory([int(size)], models=[] if impl == "ref" else [impl], reference=impl == "ref",
                            max_atoms=max_atoms, seed=seed)
    elif kind == "md":
        rows = md_memory([int(size)], ours=impl == "ours", reference=impl == "ref")
    else:
        raise ValueError(f"--one {spec!r}: use train:<batch>:<impl> or md:<atoms>:<impl>")
    return rows[0]


def _finish_row(rows: list[dict], row: dict, ours: Sequence[str],
                on_row: Callable[[list[dict]], None] | None) -> None:
    """Add ``ref_over_<name>`` (chgnet's peak over ours) when chgnet was measured; append the row
    and report the rows so far."""
    if "ref_mib" in row:
        for name in ours:
            row[f"ref_over_{name}"] = _ratio(row["ref_mib"], row.get(f"{name}_mib"))
    rows.append(row)
    if on_row is not None:
        on_row(rows)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def largest_fit(rows: list[dict], key: str, budget_gib: float = 30.0) -> dict[str, float] | None:
    """Linear fit ``MiB = a + b * atoms`` of ``rows[key]`` and the atom count that fits in
    ``budget_gib``; None with fewer than two sizes."""
    pts = [(r["n_atoms"], r[key]) for r in rows if r.get(key) is not None]
    if len(pts) < 2:
        return None
    x, y = np.array(pts, dtype=float).T
    b, a = np.polyfit(x, y, 1)
    return {"mib_per_atom": float(b), "intercept_mib": float(a),
            "atoms_in_budget": float((budget_gib * 1024 - a) / b), "budget_gib": budget_gib}


# ----------------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None, stream: Any = None) -> dict[str, Any]:
    out = stream or sys.stdout
    p = argparse.ArgumentParser(prog="python -m fastchgnet.bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--train-batch-sizes", default="16,32,64", help="training-step batches ('' : none)")
    p.add_argument("--models", default="exact,heads", help="our variants in the training rows")
    p.add_argument("--max-atoms", type=int, default=64, help="largest structure of the training pool")
    p.add_argument("--md-atoms", default="512,1000,2000", help="Si cells of the MD rows ('' : none)")
    p.add_argument("--budget-gib", type=float, default=30.0, help="memory budget of the fit [%(default)s]")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--memory-limit-gb", type=float, default=None, metavar="GB",
                   help="cap this process's address space: a step that needs more is recorded as "
                        "out of memory (n/a) instead of the process being killed")
    p.add_argument("--isolate", action="store_true",
                   help="measure each (size, implementation) in a fresh process")
    p.add_argument("--seed", type=int, default=0, help="seed of the training batches")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    if args.memory_limit_gb:
        limit_memory(args.memory_limit_gb)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        row = _one(args.one, args.max_atoms, args.seed)
        print(json.dumps(row), file=out)
        return row
    t0 = time.perf_counter()
    env = environment("cpu")
    settings = vars(args)
    result: dict[str, Any] = {"train": [], "md": [], "fit": {}}
    save = partial_saver(args.json, env, settings, t0)

    def progress(msg: str) -> None:
        print(f"# {msg}", file=out, flush=True)

    def saver(key: str) -> Callable[[list[dict]], None]:
        def on_row(rows: list[dict]) -> None:
            result[key] = rows
            if save is not None:
                save([result])
        return on_row

    sizes = [int(x) for x in args.train_batch_sizes.split(",") if x]
    if sizes:
        models = [m for m in args.models.split(",") if m]
        result["train"] = train_memory(sizes, models=models, reference=not args.no_reference,
                                       max_atoms=args.max_atoms, seed=args.seed, isolate=args.isolate,
                                       memory_limit_gb=args.memory_limit_gb, progress=progress,
                                       on_row=saver("train"))
        head = ["batch", "atoms", "angles"] + [f"{m} MiB" for m in models] + ["chgnet MiB"] + \
               [f"chgnet/{m}" for m in models]
        print(text_table(head, [[str(r["batch_size"]), str(r.get("atoms", "n/a")), str(r.get("angles", "n/a"))]
                                + [fmt_or_na(r[f"{m}_mib"], ".0f") for m in models]
                                + [fmt_or_na(r.get("ref_mib"), ".0f")]
                                + [fmt_or_na(r.get(f"ref_over_{m}"), ".2f") for m in models]
                                for r in result["train"]]), file=out)
    md = [int(x) for x in args.md_atoms.split(",") if x]
    if md:
        result["md"] = md_memory(md, reference=not args.no_reference, isolate=args.isolate,
                                 memory_limit_gb=args.memory_limit_gb, progress=progress,
                                 on_row=saver("md"))
        for key in ("ours_mib", "ref_mib"):
            fit = largest_fit(result["md"], key, args.budget_gib)
            if fit is not None:
                result["fit"][key] = fit
        print(text_table(["atoms", "ours MiB", "chgnet MiB", "chgnet/ours"],
                         [[str(r["n_atoms"]), fmt_or_na(r.get("ours_mib"), ".0f"),
                           fmt_or_na(r.get("ref_mib"), ".0f"), fmt_or_na(r.get("ref_over_ours"), ".2f")]
                          for r in result["md"]]), file=out)
        for key, fit in result["fit"].items():
            who = "fastchgnet" if key == "ours_mib" else "chgnet"
            print(f"{who}: {fit['mib_per_atom']:.2f} MiB/atom -> about {fit['atoms_in_budget']:,.0f} atoms "
                  f"in {fit['budget_gib']:g} GiB of tensor memory", file=out)
    if args.json:
        save_record(args.json, env, settings, time.perf_counter() - t0, [result], out)
    return result


if __name__ == "__main__":
    main()
