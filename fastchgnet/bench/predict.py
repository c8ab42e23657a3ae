"""Prediction benchmark: graph construction and ``predict`` of fastchgnet against the reference
``chgnet`` package, side by side.

Cases: graph construction of the 864-atom supercell and of the two unit cells
(``fastchgnet.build_graph`` vs chgnet's ``CrystalGraphConverter``), and end-to-end prediction
(graph construction, batching, model, results back on the host) of 16 varied structures with
task ``e`` and ``efsm`` at batch size 1 and 16 (``model.predict`` vs ``predict_structure``);
without ``quick``, also single-structure ``efsm`` predictions of the two unit cells.

Every case times our implementation and the reference in the same process, on the same device,
interleaved, after warm-up (see :mod:`fastchgnet.bench.common`). A row holds medians and the ratio
``ref_ms / ours_ms`` (> 1 means we are faster). On CUDA a prediction row also holds the peak
memory of one call (``torch.cuda.max_memory_allocated`` after a reset) and the CUDA kernels
launched by one call (counted with ``torch.profiler``).

Used by ``fastchgnet bench`` and ``fastchgnet demo`` (:func:`main_bench`); ``benchmarks/`` has the
pytest-benchmark version of the same cases.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from fastchgnet.bench.common import (
    BenchStructures,
    bench_structures,
    count_cuda_kernels,
    fmt_or_na,
    graph_counts,
    load_our_model,
    load_reference,
    peak_memory_mib,
    quiet,
    reference_converter,
    resolve_device,
    save_record,
    start_run,
    text_table,
    time_interleaved,
    timing_fields,
)
from fastchgnet.data.graph import build_graph

__all__ = ["format_table", "main_bench", "run_bench"]


@dataclass
class _Case:
    name: str
    kind: str  # "graph" or "predict"
    n_structures: int
    n_atoms: int
    ours: Callable[[], Any]
    ref: Callable[[], Any] | None
    extra: dict


def _cases(device: str, quick: bool, model: Any, ref: Any | None, conv: Any | None,
           structs: BenchStructures) -> list[_Case]:
    cases: list[_Case] = []
    graph_inputs = [(f"graph {structs.names[2]}", structs.large),
                    (f"graph {structs.names[0]}", structs.small),
                    (f"graph {structs.names[1]}", structs.medium)]
    for name, s in graph_inputs:
        g = build_graph(s)
        extra: dict[str, Any] = graph_counts([g])
        if conv is not None:
            with quiet():
                rg = conv(s)
            extra["ref_directed_bonds"] = int(rg.atom_graph.shape[0])
            extra["ref_angles"] = int(rg.bond_graph.shape[0])
            extra["same_graph_size"] = (extra["ref_directed_bonds"] == extra["directed_bonds"]
                                        and extra["ref_angles"] == extra["angles"])
        cases.append(_Case(name, "graph", 1, len(s), (lambda s=s: build_graph(s)),
                           (lambda s=s: conv(s)) if conv is not None else None, extra))

    def predict_case(name: str, items: list, task: str, bs: int) -> _Case:
        counts = graph_counts([build_graph(s) for s in items])
        extra = {**counts, "task": task, "batch_size": bs,
                 "dtype": str(next(model.parameters()).dtype)}

        def ours() -> Any:
            return model.predict(items, task=task, batch_size=bs)

        def reference() -> Any:
            with quiet():
                return ref.predict_structure(items, task=task, batch_size=bs)

        return _Case(name, "predict", len(items), counts["atoms"], ours,
                     reference if ref is not None else None, extra)

    n = len(structs.batch)
    for task in ("e", "efsm"):
        for bs in (1, 16):
            cases.append(predict_case(f"predict {task} {n}x b{bs}", structs.batch, task, bs))
    if not quick:
        for label, s in ((structs.names[0], structs.small), (structs.names[1], structs.medium)):
            cases.append(predict_case(f"predict efsm {label}", [s], "efsm", 1))
    return cases


def run_bench(
    device: str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    quick: bool = False,
    *,
    reference: bool = True,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Run all cases; one dict per case (see the module docstring).

    Args:
        device: ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``) or ``"auto"``.
        repeats: timed calls per implementation and case (medians are reported).
        warmup: untimed calls per implementation and case first.
        quick: fewer repeats (at most 2) and no single-structure prediction cases.
        reference: also time the reference ``chgnet`` when it is installed.
        threads: torch intra-op threads for the run (restored afterwards); None keeps the current
            setting. On a shared machine 1 thread is far less noisy than oversubscribed threads.
        progress: called with each case's name before it runs (e.g. ``print``).
    """
    device = resolve_device(device)
    if threads is not None:
        old = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return run_bench(device, repeats, warmup, quick, reference=reference, threads=None,
                             progress=progress)
        finally:
            torch.set_num_threads(old)
    if quick:
        repeats = min(repeats, 2)
    repeats = max(1, int(repeats))
    warmup = max(0, int(warmup))
    model, weights = load_our_model(device)
    ref = load_reference(device) if reference else None
    conv = reference_converter() if reference else None
    structs = bench_structures()

    rows: list[dict] = []
    for case in _cases(device, quick, model, ref, conv, structs):
        if progress is not None:
            progress(case.name)
        fns = {"ours": case.ours}
        if case.ref is not None:
            fns["ref"] = case.ref
        times = time_interleaved(fns, device, repeats=repeats, warmup=warmup)
        row: dict[str, Any] = {
            "case": case.name,
            "kind": case.kind,
            "device": device,
            "n_structures": case.n_structures,
            "n_atoms": case.n_atoms,
            **timing_fields(times, repeats, warmup),
            "structures": structs.source,
            "weights": weights,
            "torch_threads": torch.get_num_threads(),
            **case.extra,
        }
        if device.startswith("cuda"):
            # graph construction runs on the host in both implementations: no device numbers
            on_device = case.kind == "predict"
            row["ours_peak_mib"] = peak_memory_mib(case.ours, device) if on_device else None
            row["ref_peak_mib"] = (peak_memory_mib(case.ref, device)
                                   if on_device and case.ref is not None else None)
            row["ours_kernels"] = count_cuda_kernels(case.ours, device) if on_device else None
            row["ref_kernels"] = (count_cuda_kernels(case.ref, device)
                                  if on_device and case.ref is not None else None)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text table of :func:`run_bench` rows (CUDA columns only when a row has them)."""
    cuda = any("ours_peak_mib" in r for r in rows)
    head = ["case", "structs", "atoms", "ours ms", "ref ms", "ref/ours"]
    if cuda:
        head += ["ours MiB", "ref MiB", "ours kern", "ref kern"]
    body = []
    for r in rows:
        line = [r["case"], str(r["n_structures"]), str(r["n_atoms"]),
                fmt_or_na(r["ours_ms"], ".2f"), fmt_or_na(r.get("ref_ms"), ".2f"),
                "n/a" if r.get("ratio") is None else f"{r['ratio']:.2f}x"]
        if cuda:
            line += [fmt_or_na(r.get("ours_peak_mib"), ".1f"),
                     fmt_or_na(r.get("ref_peak_mib"), ".1f"),
                     fmt_or_na(r.get("ours_kernels"), "d"), fmt_or_na(r.get("ref_kernels"), "d")]
        body.append(line)
    return text_table(head, body)


def main_bench(device: str = "auto", repeats: int = 5, warmup: int = 1, quick: bool = False,
               json_path: str | None = None, threads: int | None = None,
               stream: Any = None) -> list[dict]:
    """Run, print the table (and environment), optionally save ``{environment, rows}`` as JSON."""
    stream = stream or sys.stdout
    device, env = start_run(device, threads, stream)
    t0 = time.perf_counter()
    rows = run_bench(device, repeats=repeats, warmup=warmup, quick=quick,
                     progress=lambda name: print(f"  running {name} ...", file=sys.stderr,
                                                 flush=True))
    wall = time.perf_counter() - t0
    print(format_table(rows), file=stream)
    ref_note = "" if any(r.get("ref_ms") is not None for r in rows) else " (chgnet not installed)"
    done = rows[0]["repeats"] if rows else repeats
    print(f"# medians of {done} interleaved calls after {warmup} warm-up; "
          f"ratio = ref/ours{ref_note}; "
          f"structures: {rows[0]['structures'] if rows else '?'}; total {wall:.1f} s",
          file=stream)
    if json_path:
        save_record(json_path, env, {"repeats": repeats, "warmup": warmup, "quick": quick,
                                     "threads": threads}, wall, rows, stream)
    return rows
