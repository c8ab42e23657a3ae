"""Training-step benchmark: one optimiser step of fastchgnet against the reference ``chgnet``.

One step = forward with energy, forces, stress and magnetic moments (forces and stress as
gradients with ``create_graph=True``), the training loss, backward (second derivatives through
the force/stress gradient), ``optimizer.step()`` and ``zero_grad()``. Both models start from the
CHGNet 0.3.0 weights and train all their trainable parameters (the AtomRef composition model is
frozen in both) with Adam (lr 1e-3). The loss is the same on both sides:

    L = 2 * huber(e) + 1.5 * huber(f) + 0.1 * huber(s) + 0.1 * huber(m),   huber delta = 0.1

(energy per atom in eV, forces eV/Å, stress GPa, magnetic moments μB; each term the mean over its
elements — the FastCHGNet / CHGNet defaults).

What is timed on each side:

* **ours** (:func:`ours_train_step`): what :class:`fastchgnet.train.Trainer` runs in a step —
  the loss is the library's :class:`fastchgnet.train.loss.EFSMLoss` on
  :class:`~fastchgnet.train.loss.Targets` from :func:`~fastchgnet.train.loss.collate_targets`
  (with masks; every label present), the optimiser the library's
  :func:`fastchgnet.train.schedule.make_optimizer` (Adam over the trainable parameters);
* **chgnet** (:func:`chgnet_train_step`): chgnet's model, its ``forward(graphs, task="efsm")``,
  the same Huber formula computed directly on its concatenated outputs (:func:`train_loss`), and
  Adam over its trainable parameters (:func:`reference_optimizer`).

What is inside the timed step and what is not, as with a DataLoader feeding the loop:

* outside: graph construction (``fastchgnet.build_graph`` / ``chgnet.graph.CrystalGraphConverter``),
  collation into our :class:`~fastchgnet.data.batch.Batch` and the labels into ``Targets``, the
  host-to-device copies;
* inside: everything the model does with the batch. For ``chgnet`` that includes its own
  featurisation (``BatchedGraph.from_graphs``: bond vectors, bases, index offsets), which is part
  of its ``forward``.

Structures: :func:`fastchgnet.bench.train_data.chgnet_like_batch`.

Run: ``python -m fastchgnet.bench.train_step [--device cuda] [--json PATH]``; from Python
:func:`run_train_bench` (rows) and :func:`format_train_table`.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from fastchgnet.bench.common import (
    count_cuda_kernels,
    fmt_or_na,
    graph_counts,
    int_list,
    load_our_model,
    load_reference,
    partial_saver,
    quiet,
    reference_converter,
    resolve_device,
    save_record,
    start_run,
    step_memory_mib,
    text_table,
    time_interleaved,
    timing_fields,
)
from fastchgnet.bench.train_data import TrainData, chgnet_like_batch, default_max_atoms
from fastchgnet.data.batch import collate
from fastchgnet.data.graph import build_graphs
from fastchgnet.kernels import override as kernels_env
from fastchgnet.kernels import use_triton
from fastchgnet.compile import CompiledStep
from fastchgnet.model.weights import MODEL_TYPES
from fastchgnet.train.loss import DEFAULT_PREFACTORS, EFSMLoss, Targets, collate_targets
from fastchgnet.train.schedule import make_optimizer

__all__ = [
    "HUBER_DELTA",
    "LEARNING_RATE",
    "LOSS_WEIGHTS",
    "TrainData",
    "chgnet_inputs",
    "chgnet_like_batch",
    "chgnet_train_step",
    "default_batch_sizes",
    "default_max_atoms",
    "format_train_table",
    "kernels_env",
    "kernels_used",
    "main",
    "make_loss",
    "our_inputs",
    "ours_train_step",
    "reference_optimizer",
    "reference_training",
    "run_train_bench",
    "step_memory_mib",
    "train_loss",
    "variant_steps",
]

# the FastCHGNet / CHGNet training defaults
LOSS_WEIGHTS = dict(DEFAULT_PREFACTORS)  # e 2.0, f 1.5, s 0.1, m 0.1
HUBER_DELTA = 0.1
LEARNING_RATE = 1e-3


def default_batch_sizes(device: str) -> tuple[int, ...]:
    """(16, 32, 64) structures per step on CUDA; (4, 8) on the CPU (about 2 minutes in all)."""
    return (16, 32, 64) if str(device).startswith("cuda") else (4, 8)


def make_loss() -> EFSMLoss:
    """Our loss: the library's :class:`~fastchgnet.train.loss.EFSMLoss` (Huber, delta 0.1, the
    default prefactors), as the Trainer builds it."""
    return EFSMLoss(**LOSS_WEIGHTS, delta=HUBER_DELTA, loss="huber")


_LOSS = make_loss()


# ----------------------------------------------------------------------------------------------
# inputs


def our_inputs(data: TrainData, model: Any, device: str) -> tuple[Any, Targets, dict]:
    """(batch on ``device``, :class:`~fastchgnet.train.loss.Targets` on ``device``, graph sizes)
    for :func:`ours_train_step`; collated on the host as the Trainer's ``Collator`` does."""
    graphs = build_graphs(data.structures, **model.graph_kwargs())
    dtype = next(model.parameters()).dtype
    batch = collate(graphs, dtype=dtype)
    targets = collate_targets(data.label_dicts(), batch, dtype=dtype)
    return batch.to(device), targets.to(device), graph_counts(graphs)


def chgnet_inputs(data: TrainData, converter: Any,
                  device: str) -> tuple[list, dict[str, torch.Tensor], dict]:
    """(reference graphs on ``device``, labels on ``device``, graph sizes) for
    :func:`chgnet_train_step`.

    As in the reference trainer, fractional coordinates and lattice require grad (forces,
    stress); here they are made leaves on the device once, like a batch moved before the step.
    """
    graphs = []
    with quiet():
        for s in data.structures:
            g = converter(s).to(device)
            g.atom_frac_coord = g.atom_frac_coord.detach().requires_grad_(True)
            g.lattice = g.lattice.detach().requires_grad_(True)
            graphs.append(g)
    sizes = {"ref_directed_bonds": sum(int(g.atom_graph.shape[0]) for g in graphs),
             "ref_angles": sum(int(g.bond_graph.shape[0]) for g in graphs)}
    return graphs, data.label_tensors(device, torch.float32), sizes


# ----------------------------------------------------------------------------------------------
# the step


def train_loss(pred: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """chgnet's side of the loss: the weighted Huber loss over energy per atom, forces, stress
    and magnetic moments on concatenated tensors (the same numbers as :func:`make_loss`'s
    ``EFSMLoss`` when every label is present)."""
    loss = None
    for key, weight in LOSS_WEIGHTS.items():
        term = weight * F.huber_loss(pred[key], labels[key], delta=HUBER_DELTA)
        loss = term if loss is None else loss + term
    return loss


def ours_train_step(model: Any, optimizer: torch.optim.Optimizer, batch: Any, targets: Targets,
                    loss_fn: EFSMLoss = _LOSS, forward: Any = None) -> torch.Tensor:
    """One training step of fastchgnet on a collated batch already on the device; ``forward``:
    the model's forward to call instead of ``model`` (e.g. a compiled one).

    Returns the loss (a detached tensor: no host synchronisation here).
    """
    out = (model if forward is None else forward)(batch, task="efsm", create_graph=True)
    loss, _ = loss_fn(out, targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def reference_optimizer(model: torch.nn.Module, lr: float = LEARNING_RATE) -> torch.optim.Adam:
    """Adam over the trainable parameters of chgnet's model (its AtomRef frozen)."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)


def reference_training(device: str, reference: bool = True) -> tuple[Any, Any, Any]:
    """chgnet's 0.3.0 model in training mode, its graph converter and an Adam for it; three Nones
    when not wanted or when chgnet is not installed."""
    ref = load_reference(device) if reference else None
    if ref is None:
        return None, None, None
    ref.train()
    return ref, reference_converter(), reference_optimizer(ref)


def variant_steps(exact: Any, names: Sequence[str],
                  compile_heads: bool = False) -> dict[str, Callable[[Any, Any], torch.Tensor]]:
    """Training-step functions ``step(batch, targets) -> loss`` of other model variants, each a
    copy of ``exact``'s weights in that variant (heads: seeded initialisation) with its own Adam.
    ``heads_compiled`` (with ``compile_heads``) is the heads step under
    :class:`~fastchgnet.compile.CompiledStep`."""
    p = next(exact.parameters())
    steps: dict[str, Callable[[Any, Any], torch.Tensor]] = {}
    wanted = list(names) + (["heads_compiled"] if compile_heads else [])
    for name in wanted:
        kind = "heads" if name == "heads_compiled" else name
        if kind not in MODEL_TYPES:
            raise ValueError(f"unknown model variant {name!r}; known: {sorted(MODEL_TYPES)}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = MODEL_TYPES[kind](exact.config)
        net.load_state_dict(exact.state_dict(), strict=False)
        net = net.to(device=p.device, dtype=p.dtype).train()
        opt = make_optimizer(net, LEARNING_RATE)
        if name == "heads_compiled":
            steps[name] = CompiledStep(net, make_loss(), opt)
        else:
            steps[name] = functools.partial(ours_train_step, net, opt)
    return steps


def chgnet_train_step(model: Any, optimizer: torch.optim.Optimizer, graphs: Sequence[Any],
                      labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same step on the reference ``chgnet.model.CHGNet`` (graphs already on the device).

    Its ``forward(graphs, task="efsm")`` returns ``e`` (B,) and per-structure lists: ``f``
    (n_i, 3), ``s`` (3, 3), ``m`` (n_i,); they are concatenated to the label layout.
    """
    with warnings.catch_warnings():
        # chgnet warns that it turns the (grad-requiring) cell volumes into a tensor: harmless
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
        out = model(graphs, task="efsm")
    pred = {"e": out["e"], "f": torch.cat(list(out["f"])), "s": torch.stack(list(out["s"])),
            "m": torch.cat(list(out["m"]))}
    loss = train_loss(pred, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def kernels_used(device: str) -> str:
    """``triton`` or ``torch``: the path the fused ops take for tensors on ``device`` under the
    current ``FASTCHGNET_KERNELS``; raises ValueError for an impossible request (``triton`` on
    the CPU without ``TRITON_INTERPRET=1``, or without the triton package)."""
    try:
        return "triton" if use_triton(torch.empty(0, device=device)) else "torch"
    except RuntimeError as exc:
        raise ValueError(str(exc)) from None


# ----------------------------------------------------------------------------------------------
# the benchmark


def run_train_bench(
    device: str = "auto",
    batch_sizes: Sequence[int] | None = None,
    repeats: int = 5,
    warmup: int = 2,
    kernels: str | None = "auto",
    *,
    reference: bool = True,
    max_atoms: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    models: Sequence[str] = ("exact",),
    compile_heads: bool = False,
    on_row: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Time one training step of both implementations at each batch size; one row per size.

    Args:
        device: ``cpu``, ``cuda`` (``cuda:N``) or ``auto``.
        batch_sizes: structures per step; default :func:`default_batch_sizes` of the device.
        repeats: timed steps per implementation (interleaved ours/ref; medians reported).
        warmup: untimed steps per implementation first (Triton/cuBLAS warm-up, allocator).
        kernels: ``FASTCHGNET_KERNELS`` for the run (``auto``, ``triton``, ``torch``; None: the
            environment's); the row records the path actually taken (``kernels``).
        reference: also time ``chgnet`` when it is installed.
        max_atoms: largest structure; default
            :func:`~fastchgnet.bench.train_data.default_max_atoms` of the device.
        seed: seed of the structures (batch size ``B`` uses ``seed + B``) and labels.
        threads: torch intra-op threads for the run (restored afterwards).
        progress: called with each case's name before it runs.
        models: our model variants to time side by side (``exact``, ``decoupled``, ``heads``),
            all from the same 0.3.0 backbone weights (the heads start from their seeded
            initialisation); ``exact`` is always included and is the ``ours`` columns.
        compile_heads: also time the ``heads`` step compiled with
            :class:`~fastchgnet.compile.CompiledStep` (Inductor, dynamic shapes) as
            ``heads_compiled``; its compilation happens in the warm-up steps.
        on_row: called with the rows so far after each batch size (e.g. to save partial
            results of a run with a time limit).

    Row fields: ``case``, ``batch_size``, ``atoms``, ``bonds``, ``directed_bonds``, ``angles``,
    ``ours_ms``, ``ref_ms``, ``ratio`` (ref/ours, > 1: fastchgnet faster), minima and all
    timings, ``kernels`` (used) and ``kernels_requested``, ``loss_ours``/``loss_ref`` (of the
    last step), and on CUDA ``ours_peak_mib``/``ref_peak_mib`` (peak allocated during one
    step), ``ours_step_mib``/``ref_step_mib`` (the part above what was allocated before the
    step), ``ours_kernels``/``ref_kernels`` (CUDA kernels launched by one step). Each extra
    variant ``V`` adds ``V_ms``, ``V_vs_exact`` (exact/V, > 1: V faster), ``V_vs_ref``, ``loss_V``
    and on CUDA ``V_peak_mib``, ``V_kernels``.
    """
    device = resolve_device(device)
    if threads is not None:
        old = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return run_train_bench(device, batch_sizes, repeats, warmup, kernels,
                                   reference=reference, max_atoms=max_atoms, seed=seed,
                                   progress=progress, models=models, compile_heads=compile_heads,
                                   on_row=on_row)
        finally:
            torch.set_num_threads(old)
    sizes = tuple(int(b) for b in (batch_sizes or default_batch_sizes(device)))
    max_atoms = int(max_atoms or default_max_atoms(device))
    repeats, warmup = max(1, int(repeats)), max(0, int(warmup))
    cuda = device.startswith("cuda")

    with kernels_env(kernels):
        used = kernels_used(device)
        requested = os.environ.get("FASTCHGNET_KERNELS", "auto")
        model, weights = load_our_model(device)
        model.train()
        opt = make_optimizer(model, LEARNING_RATE)
        variants = variant_steps(model, [m for m in models if m != "exact"], compile_heads)
        ref, conv, ref_opt = reference_training(device, reference)

        rows: list[dict] = []
        for bs in sizes:
            name = f"train efsm b{bs}"
            if progress is not None:
                progress(name)
            data = chgnet_like_batch(bs, seed + bs, max_atoms=max_atoms)
            batch, targets, counts = our_inputs(data, model, device)
            last: dict[str, torch.Tensor] = {}

            def ours(batch=batch, targets=targets) -> None:
                last["ours"] = ours_train_step(model, opt, batch, targets)

            fns: dict[str, Callable[[], Any]] = {"ours": ours}
            for vname, vstep in variants.items():
                def variant(vname=vname, vstep=vstep, batch=batch, targets=targets) -> None:
                    last[vname] = vstep(batch, targets)

                fns[vname] = variant
            ref_sizes: dict = {}
            if ref is not None:
                graphs, ref_labels, ref_sizes = chgnet_inputs(data, conv, device)

                def reference_step(graphs=graphs, ref_labels=ref_labels) -> None:
                    last["ref"] = chgnet_train_step(ref, ref_opt, graphs, ref_labels)

                fns["ref"] = reference_step
            times = time_interleaved(fns, device, repeats=repeats, warmup=warmup)
            row: dict[str, Any] = {
                "case": name,
                "device": device,
                "batch_size": bs,
                "n_structures": bs,
                "n_atoms": counts["atoms"],
                **counts,
                **ref_sizes,
                **timing_fields(times, repeats, warmup),
                "kernels": used,
                "kernels_requested": requested,
                "max_atoms": max_atoms,
                "structures": data.source,
                "weights": weights,
                "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                "torch_threads": torch.get_num_threads(),
                "loss_ours": float(last["ours"]) if "ours" in last else None,
                "loss_ref": float(last["ref"]) if "ref" in last else None,
            }
            for vname in variants:
                v_ms = statistics.median(times[vname])
                row.update({f"{vname}_ms": v_ms, f"{vname}_ms_all": times[vname],
                            f"{vname}_vs_exact": row["ours_ms"] / v_ms,
                            f"{vname}_vs_ref": row["ref_ms"] / v_ms if row["ref_ms"] else None,
                            f"loss_{vname}": float(last[vname])})
                if cuda:
                    row[f"{vname}_peak_mib"], _ = step_memory_mib(fns[vname], device)
                    row[f"{vname}_kernels"] = count_cuda_kernels(fns[vname], device)
            if cuda:
                row["ours_peak_mib"], row["ours_step_mib"] = step_memory_mib(fns["ours"], device)
                row["ours_kernels"] = count_cuda_kernels(fns["ours"], device)
                if "ref" in fns:
                    row["ref_peak_mib"], row["ref_step_mib"] = step_memory_mib(fns["ref"], device)
                    row["ref_kernels"] = count_cuda_kernels(fns["ref"], device)
                else:
                    row.update(ref_peak_mib=None, ref_step_mib=None, ref_kernels=None)
            rows.append(row)
            if on_row is not None:  # e.g. save partial results of a run with a time limit
                on_row(rows)
            del batch, targets, fns
            if cuda:
                torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# output


def _variants(rows: list[dict]) -> list[str]:
    """Names of the extra model variants present in the rows (in order of appearance)."""
    seen: list[str] = []
    for r in rows:
        seen += [k[:-len("_vs_exact")] for k in r if k.endswith("_vs_exact") and
                 k[:-len("_vs_exact")] not in seen]
    return seen


def _times(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def format_train_table(rows: list[dict]) -> str:
    """Plain-text table of :func:`run_train_bench` rows (memory/kernel columns on CUDA; one
    time and one exact/variant ratio column per extra model variant)."""
    cuda = any("ours_peak_mib" in r for r in rows)
    variants = _variants(rows)
    head = ["case", "atoms", "bonds", "angles", "ours ms", "chgnet ms", "chgnet/ours"]
    for v in variants:
        head += [f"{v} ms", f"exact/{v}", f"chgnet/{v}"]
    if cuda:
        head += ["ours MiB", "chgnet MiB", "ours kern", "chgnet kern"]
        head += [f"{v} MiB" for v in variants]
    head.append("kernels")
    body = []
    for r in rows:
        line = [r["case"], str(r["atoms"]), str(r["bonds"]), str(r["angles"]),
                fmt_or_na(r["ours_ms"], ".1f"), fmt_or_na(r.get("ref_ms"), ".1f"),
                _times(r.get("ratio"))]
        for v in variants:
            line += [fmt_or_na(r.get(f"{v}_ms"), ".1f"), _times(r.get(f"{v}_vs_exact")),
                     _times(r.get(f"{v}_vs_ref"))]
        if cuda:
            line += [fmt_or_na(r.get("ours_peak_mib"), ".0f"),
                     fmt_or_na(r.get("ref_peak_mib"), ".0f"),
                     fmt_or_na(r.get("ours_kernels"), "d"), fmt_or_na(r.get("ref_kernels"), "d")]
            line += [fmt_or_na(r.get(f"{v}_peak_mib"), ".0f") for v in variants]
        line.append(str(r.get("kernels")))
        body.append(line)
    return text_table(head, body)


def main(argv: Sequence[str] | None = None, stream: Any = None) -> list[dict]:
    """``python -m fastchgnet.bench.train_step``: run, print the table, optionally save JSON."""
    p = argparse.ArgumentParser(prog="python -m fastchgnet.bench.train_step",
                                description="time one training step, fastchgnet vs chgnet")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto [%(default)s]")
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated structures per step [cuda: 16,32,64; cpu: 4,8]")
    p.add_argument("--repeats", type=int, default=5, help="timed steps each [%(default)s]")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps each [%(default)s]")
    p.add_argument("--kernels", default="auto", choices=("auto", "triton", "torch"),
                   help="FASTCHGNET_KERNELS for the run [%(default)s]")
    p.add_argument("--max-atoms", type=int, default=None,
                   help="largest structure [cuda: 64; cpu: 16]")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--no-reference", action="store_true", help="time fastchgnet only")
    p.add_argument("--models", default="exact",
                   help="comma-separated variants timed side by side: exact, decoupled, heads "
                        "[%(default)s]")
    p.add_argument("--compile", action="store_true",
                   help="also time the heads step compiled (CompiledStep, Inductor)")
    p.add_argument("--json", default=None, metavar="PATH", help="save environment and rows")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    stream = stream or sys.stdout

    device, env = start_run(args.device, args.threads, stream)
    sizes = int_list(args.batch_sizes)
    t0 = time.perf_counter()
    settings = {k: getattr(args, k) for k in ("batch_sizes", "repeats", "warmup", "kernels",
                                              "max_atoms", "threads", "no_reference",
                                              "models", "compile")}
    settings.update(loss_weights=LOSS_WEIGHTS, huber_delta=HUBER_DELTA, optimizer="Adam",
                    lr=LEARNING_RATE,
                    loss={"ours": "fastchgnet.train.loss.EFSMLoss on collated Targets",
                          "ref": "the same weighted Huber on chgnet's concatenated outputs"})

    try:
        rows = run_train_bench(device, sizes, args.repeats, args.warmup, args.kernels,
                               reference=not args.no_reference, max_atoms=args.max_atoms,
                               models=models, compile_heads=args.compile,
                               on_row=partial_saver(args.json, env, settings, t0),
                               progress=lambda n: print(f"  running {n} ...", file=sys.stderr,
                                                        flush=True))
    except ValueError as exc:  # e.g. --kernels triton on the CPU without TRITON_INTERPRET=1
        p.error(str(exc))
    wall = time.perf_counter() - t0
    print(format_train_table(rows), file=stream)
    src = rows[0]["structures"] if rows else "?"
    print(f"# one training step (efsm forward, Huber loss, backward, Adam step); medians of "
          f"{args.repeats} interleaved steps after {args.warmup} warm-up; ratio = chgnet/ours; "
          f"structures: {src}; total {wall:.1f} s", file=stream)
    if args.json:
        save_record(args.json, env, settings, wall, rows, stream)
    return rows


if __name__ == "__main__":
    main()
