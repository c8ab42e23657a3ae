"""Data-parallel scaling: measured step time against per-rank batch, plus an all-reduce model,
give a strong- and weak-scaling prediction for 4-32 GPUs.

Run on the GPU the prediction is for::

    python -m fastchgnet.bench.scaling --device cuda --json results/scaling.json

What it does:

1. **Measures** the time of one training step on this device (forward with forces and stress by
   autograd, the efsm Huber loss, the second-order backward, Adam) for every per-rank batch size
   of ``--batch-sizes``, on MPtrj-like structures (built-in prototypes, up to ``--max-atoms``
   atoms), and fits ``t(b) = t0 + k * b``.
2. **Models the all-reduce** of the gradients (``4 * n_params`` bytes in fp32) as a hierarchical
   ring: reduce-scatter/all-gather inside a node over NVLink, a ring across nodes over InfiniBand
   on each GPU's ``1/g`` shard::

       T_ar(P) = 2 (g-1)/g * S / B_nvlink + 2 (g-1) a_nvlink
               + 2 (n-1)/n * (S/g) / B_ib  + 2 (n-1) a_ib        (g GPUs per node, n nodes)

   plus two latency-only all-reduces per step (the loss's global label counts and DDP's
   unused-parameter map). The bandwidths and latencies are *parameters* (``--nvlink-gbps`` ...),
   defaults typical of DGX A100 nodes with one HDR InfiniBand NIC per GPU; replace them with
   ``nccl-tests`` ``all_reduce_perf`` numbers of the target cluster. By default the all-reduce
   is counted as fully exposed (no overlap with the backward; ``--overlap`` changes that).
3. **Models the load imbalance**: the slowest rank sets the step. With the balancer's per-rank
   cost CV ``c`` (simulated on a long-tailed MPtrj-like size distribution for every ``(P, b)``)
   the slowest of ``P`` ranks carries about ``1 + c * z(P)`` times the mean cost, ``z(P)`` the
   expected maximum of ``P`` standard normals. Only the size-dependent part ``k * b`` scales.
4. **Predicts** ``T_step(P) = t0 + k * b * (1 + c z(P)) + (1 - overlap) * T_ar(P)`` and the
   efficiencies relative to ``--base-ranks`` (4): strong scaling at a fixed global batch
   (``b = B / P``), weak scaling at a fixed per-rank batch.

The measured inputs are only as good as the device they were taken on: a CPU run exercises the
tool, it predicts nothing about GPUs.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np
import torch

from fastchgnet.bench.common import environment, resolve_device, save_record, text_table, time_call
from fastchgnet.data.batch import collate
from fastchgnet.data.graph import build_graphs
from fastchgnet.data.prototypes import random_structures
from fastchgnet.model.config import CHGNetConfig
from fastchgnet.model.weights import MODEL_TYPES
from fastchgnet.train.balance import load_cv, partition, sample_costs, synthetic_sizes
from fastchgnet.train.loss import EFSMLoss, collate_targets
from fastchgnet.train.schedule import make_optimizer

__all__ = ["PAPER_STRONG", "TINY_CONFIG", "Network", "allreduce_ms", "expected_max_normal",
           "fit_step_time", "format_prediction", "latency_ms", "main", "measure_step_times",
           "predict", "simulated_cv"]

PAPER_STRONG = {8: 0.825, 16: 0.795, 32: 0.66}  # FastCHGNet paper: efficiency vs 4 A100s
TINY_CONFIG = dict(atom_fea_dim=8, bond_fea_dim=8, angle_fea_dim=8, num_radial=5, num_angular=5,
                   atom_conv_hidden_dim=8, bond_conv_hidden_dim=8, mlp_hidden_dims=(8,), n_conv=2)


@dataclass
class Network:
    """All-reduce cost parameters (GB/s = 1e9 bytes/s; latencies per ring step, in μs).

    Defaults: DGX A100-like nodes (8 GPUs on NVLink 3 / NVSwitch, NCCL bus bandwidth ~230 GB/s;
    one 200 Gb/s HDR InfiniBand NIC per GPU, ~23 GB/s achieved). Assumptions, not measurements.
    """

    gpus_per_node: int = 8
    nvlink_gbps: float = 230.0
    nvlink_latency_us: float = 5.0
    ib_gbps: float = 23.0
    ib_latency_us: float = 10.0
    small_collectives: int = 2  # latency-only all-reduces per step (label counts, unused map)


def allreduce_ms(n_bytes: float, ranks: int, net: Network) -> float:
    """Modelled time (ms) of one all-reduce of ``n_bytes`` over ``ranks`` GPUs (hierarchical ring)."""
    if ranks <= 1:
        return 0.0
    g = min(ranks, net.gpus_per_node)
    n = math.ceil(ranks / net.gpus_per_node)
    t = 2 * (g - 1) / g * n_bytes / (net.nvlink_gbps * 1e9) + 2 * (g - 1) * net.nvlink_latency_us * 1e-6
    if n > 1:
        t += 2 * (n - 1) / n * (n_bytes / g) / (net.ib_gbps * 1e9) + 2 * (n - 1) * net.ib_latency_us * 1e-6
    return t * 1e3


def latency_ms(ranks: int, net: Network) -> float:
    """Modelled time (ms) of one tiny (latency-bound) all-reduce over ``ranks`` GPUs."""
    return allreduce_ms(0.0, ranks, net)


def expected_max_normal(p: int) -> float:
    """Expected maximum of ``p`` standard normal samples (Blom's approximation; 0 for p = 1)."""
    if p <= 1:
        return 0.0
    return NormalDist().inv_cdf((p - 0.375) / (p + 0.25))


def simulated_cv(ranks: int, per_rank: int, policy: str = "greedy", n_batches: int = 50,
                 sizes: np.ndarray | None = None, seed: int = 0) -> float:
    """Mean CV of per-rank cost over random global batches of ``ranks * per_rank`` samples drawn
    from ``sizes`` (default: :func:`~fastchgnet.train.balance.synthetic_sizes`)."""
    costs = sample_costs(sizes if sizes is not None else synthetic_sizes(100_000, seed=seed))
    rng = np.random.default_rng(seed + 1)
    cvs = []
    for _ in range(n_batches):
        c = costs[rng.choice(len(costs), ranks * per_rank, replace=len(costs) < ranks * per_rank)]
        cvs.append(load_cv([c[p].sum() for p in partition(c, ranks, policy)]))
    return float(np.mean(cvs))


# ----------------------------------------------------------------------------------------------
# measurement


def _step_inputs(batch_size: int, model: Any, device: str, max_atoms: int, seed: int) -> tuple[Any, Any]:
    structures = random_structures(batch_size, seed=seed, max_atoms=max_atoms)
    graphs = build_graphs(structures, **model.graph_kwargs())
    dtype = next(model.parameters()).dtype
    batch = collate(graphs, dtype=dtype)
    rng = np.random.default_rng(seed)
    labels = [{"e": float(rng.normal(-5, 1)), "f": rng.normal(0, 0.3, (len(s), 3)),
               "s": rng.normal(0, 0.5, (3, 3)), "m": np.abs(rng.normal(0, 0.5, len(s)))}
              for s in structures]
    targets = collate_targets(labels, batch, dtype=dtype)
    return batch.to(device), targets.to(device)


def measure_step_times(device: str, batch_sizes: Sequence[int], *, model_config: dict | None = None,
                       model_type: str = "exact", repeats: int = 5, warmup: int = 2,
                       max_atoms: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """Median time (ms) of one training step for each per-rank batch size, on ``device``."""
    torch.manual_seed(seed)
    model = MODEL_TYPES[model_type](CHGNetConfig(**(model_config or {}))).to(device)
    model.train()
    opt = make_optimizer(model, 1e-4)
    loss_fn = EFSMLoss()
    rows = []
    for b in batch_sizes:
        batch, targets = _step_inputs(b, model, device, max_atoms, seed + b)

        def step() -> None:
            loss, _ = loss_fn(model(batch, task="efsm", create_graph=True), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(warmup):
            step()
        times = [time_call(step, device) for _ in range(repeats)]
        rows.append({"per_rank_batch": b, "step_ms": float(np.median(times)), "times_ms": times,
                     "atoms": int(batch.n_atoms.sum()), "bonds": int(batch.bond_src.shape[0]),
                     "angles": int(batch.angle_center.shape[0])})
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for r in rows:
        r["n_params"] = n_params
    return rows


def fit_step_time(rows: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """Least-squares ``t(b) = t0 + k * b`` (ms) through the measured medians; t0, k >= 0."""
    b = np.array([r["per_rank_batch"] for r in rows], dtype=np.float64)
    t = np.array([r["step_ms"] for r in rows], dtype=np.float64)
    if len(b) == 1:
        return 0.0, float(t[0] / b[0])
    k, t0 = np.polyfit(b, t, 1)
    if t0 < 0:  # no fixed cost visible: proportional
        return 0.0, float((b @ t) / (b @ b))
    if k < 0:
        return float(t.mean()), 0.0
    return float(t0), float(k)


# ----------------------------------------------------------------------------------------------
# prediction


def predict(t0_ms: float, k_ms: float, n_params: int, *, ranks: Sequence[int] = (4, 8, 16, 32),
            base_ranks: int = 4, global_batch: int = 128, weak_batch: int = 32,
            policy: str = "greedy", net: Network | None = None, overlap: float = 0.0,
            sizes: np.ndarray | None = None) -> dict[str, list[dict[str, Any]]]:
    """Strong (fixed ``global_batch``) and weak (fixed ``weak_batch`` per rank) scaling rows:
    per-rank batch, compute, imbalance factor, all-reduce, step time, speed-up and efficiency
    relative to ``base_ranks``."""
    net = net or Network()
    n_bytes = 4.0 * n_params

    def row(p: int, b: float) -> dict[str, Any]:
        cv = simulated_cv(p, max(1, int(round(b))), policy, sizes=sizes) if p > 1 else 0.0
        imb = 1.0 + cv * expected_max_normal(p)
        comm = allreduce_ms(n_bytes, p, net) + net.small_collectives * latency_ms(p, net)
        step = t0_ms + k_ms * b * imb + (1.0 - overlap) * comm
        return {"ranks": p, "nodes": math.ceil(p / net.gpus_per_node), "per_rank_batch": b,
                "load_cv": cv, "imbalance": imb, "compute_ms": t0_ms + k_ms * b,
                "allreduce_ms": comm, "step_ms": step,
                "structures_per_s": 1e3 * b * p / step}

    out: dict[str, list[dict[str, Any]]] = {}
    for kind in ("strong", "weak"):
        rows = [row(p, global_batch / p if kind == "strong" else weak_batch) for p in ranks]
        base = next((r for r in rows if r["ranks"] == base_ranks), rows[0])
        for r in rows:
            speedup = r["structures_per_s"] / base["structures_per_s"]
            r["speedup"] = speedup
            r["efficiency"] = speedup / (r["ranks"] / base["ranks"])
            if kind == "strong" and r["ranks"] in PAPER_STRONG and base["ranks"] == 4:
                r["paper_efficiency"] = PAPER_STRONG[r["ranks"]]
        out[kind] = rows
    return out


def format_prediction(pred: dict[str, list[dict[str, Any]]]) -> str:
    lines = []
    for kind, rows in pred.items():
        head = ["ranks", "nodes", "b/rank", "load CV", "imbal.", "compute ms", "allreduce ms",
                "step ms", "struct/s", "efficiency"] + (["paper"] if kind == "strong" else [])
        body = []
        for r in rows:
            cells = [str(r["ranks"]), str(r["nodes"]), f"{r['per_rank_batch']:g}", f"{r['load_cv']:.4f}",
                     f"{r['imbalance']:.3f}", f"{r['compute_ms']:.2f}", f"{r['allreduce_ms']:.3f}",
                     f"{r['step_ms']:.2f}", f"{r['structures_per_s']:.0f}", f"{100 * r['efficiency']:.1f} %"]
            if kind == "strong":
                cells.append(f"{100 * r['paper_efficiency']:.1f} %" if "paper_efficiency" in r else "-")
            body.append(cells)
        lines.append(f"{kind} scaling ({'fixed global batch' if kind == 'strong' else 'fixed per-rank batch'})")
        lines.append(text_table(head, body))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# command line


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None, stream: Any = None) -> dict[str, Any]:
    stream = stream or sys.stdout
    p = argparse.ArgumentParser(prog="python -m fastchgnet.bench.scaling", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64", help="per-rank batches to time")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-atoms", type=int, default=64)
    p.add_argument("--model", default="exact", help="model type [%(default)s]")
    p.add_argument("--tiny", action="store_true", help="a tiny model (smoke tests), not 0.3.0's size")
    p.add_argument("--ranks", default="4,8,16,32")
    p.add_argument("--base-ranks", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=128, help="strong scaling [%(default)s]")
    p.add_argument("--weak-batch", type=int, default=32, help="weak scaling, per rank [%(default)s]")
    p.add_argument("--balance", default="greedy", choices=["none", "paper", "greedy"])
    p.add_argument("--overlap", type=float, default=0.0,
                   help="fraction of the all-reduce hidden behind the backward [%(default)s]")
    net = Network()
    for name, val in asdict(net).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(val), default=val,
                       help="all-reduce model [%(default)s]")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    net = Network(**{k: getattr(args, k) for k in asdict(net)})
    t_start = time.perf_counter()
    rows = measure_step_times(device, _ints(args.batch_sizes), model_config=TINY_CONFIG if args.tiny else None,
                              model_type=args.model, repeats=args.repeats, warmup=args.warmup,
                              max_atoms=args.max_atoms)
    t0, k = fit_step_time(rows)
    n_params = rows[0]["n_params"]
    pred = predict(t0, k, n_params, ranks=_ints(args.ranks), base_ranks=args.base_ranks,
                   global_batch=args.global_batch, weak_batch=args.weak_batch, policy=args.balance,
                   net=net, overlap=args.overlap)
    print(f"# measured on {device} ({n_params:,} trainable parameters, {4 * n_params / 1e6:.2f} MB of "
          "fp32 gradients)", file=stream)
    print(text_table(["b/rank", "atoms", "bonds", "angles", "step ms (median)"],
                     [[str(r["per_rank_batch"]), str(r["atoms"]), str(r["bonds"]), str(r["angles"]),
                       f"{r['step_ms']:.2f}"] for r in rows]), file=stream)
    print(f"# fit: t(b) = {t0:.2f} ms + {k:.3f} ms * b", file=stream)
    print(f"# all-reduce model: {net}", file=stream)
    print(format_prediction(pred), file=stream)
    if device == "cpu":
        print("# measured on the CPU: this exercises the tool; it predicts nothing about GPUs",
              file=stream)
    result = {"measured": rows, "fit": {"t0_ms": t0, "k_ms_per_structure": k}, "network": asdict(net),
              "overlap": args.overlap, "prediction": pred}
    if args.json:
        save_record(Path(args.json), environment(device), vars(args), time.perf_counter() - t_start,
                    [result], stream)
    return result


if __name__ == "__main__":  # pragma: no cover
    main()
