"""Evaluation of a model on a dataset: the weighted loss and the MAEs of energy, forces, stress and
magnetic moments, optionally sharded over the ranks of a distributed run."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastchgnet.model.exact import CHGNet
from fastchgnet.train.data import Collator, DevicePrefetcher, EpochBatchSampler, GraphDataset
from fastchgnet.train.distributed import DistEnv
from fastchgnet.train.loss import EFSMLoss, MAEAccumulator

__all__ = ["evaluate"]


def evaluate(model: CHGNet, dataset: GraphDataset, *, batch_size: int = 32,
             device: torch.device | str | None = None, task: str = "efsm",
             loss_fn: EFSMLoss | None = None, collect: bool = False,
             workers: int = 0, env: DistEnv | None = None) -> dict[str, Any]:
    """MAEs (and the weighted loss) of ``model`` on ``dataset``; forces by autograd, no
    second-order graph. With ``collect=True`` also the labelled predictions and labels as numpy
    arrays (``pred_e``/``true_e``, ...) for parity plots. With ``env`` (a distributed run, every
    rank calls it) each rank evaluates every ``world_size``-th sample and the sums are reduced."""
    if env is not None:
        if collect:
            raise ValueError("collect=True is not supported in a distributed evaluation")
        dataset = dataset.subset(np.arange(env.rank, len(dataset), env.world_size))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    loss_fn = loss_fn or EFSMLoss()
    acc = MAEAccumulator()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_struct = 0
    pairs: dict[str, list[np.ndarray]] = {f"{p}_{k}": [] for k in "efsm" for p in ("pred", "true")}
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=EpochBatchSampler(len(dataset), batch_size, shuffle=False),
        collate_fn=Collator(dtype), num_workers=workers, pin_memory=device.type == "cuda")
    try:
        for batch, targets, _ in DevicePrefetcher(loader, device, dtype):
            pred = model(batch, task=task, create_graph=False)
            pred = {k: v.detach() for k, v in pred.items()}
            loss, _ = loss_fn(pred, targets)
            loss_sum += loss.detach().double() * batch.num_graphs
            n_struct += batch.num_graphs
            acc.update(pred, targets)
            if collect:
                _collect(pairs, pred, targets)
    finally:
        model.train(was_training)
    if env is not None:
        n_struct = _reduce_eval(env, acc, loss_sum, n_struct, device)
    out: dict[str, Any] = {"n": n_struct, "loss": float(loss_sum) / max(n_struct, 1), **acc.compute()}
    if collect:
        out.update({k: (np.concatenate(v) if v else np.zeros(0)) for k, v in pairs.items()})
    return out


def _reduce_eval(env: DistEnv, acc: MAEAccumulator, loss_sum: Tensor, n_struct: int,
                 device: torch.device) -> int:
    """Sum the loss, structure count and MAE sums/counts of all ranks (in place); returns the
    global number of structures. One all-reduce of 10 numbers."""
    k = 4
    sums = acc._sums if acc._sums is not None else torch.zeros(k, dtype=torch.float64, device=device)
    counts = acc._counts if acc._counts is not None else torch.zeros(k, dtype=torch.int64, device=device)
    packed = torch.cat([loss_sum.reshape(1).double(), torch.tensor([float(n_struct)], device=device,
                                                                   dtype=torch.float64),
                        sums.double(), counts.double()])
    env.all_reduce(packed)
    loss_sum.copy_(packed[0])
    acc._sums, acc._counts = packed[2:2 + k].to(sums.dtype), packed[2 + k:].round().to(torch.int64)
    return int(packed[1])


def _collect(pairs: dict[str, list[np.ndarray]], pred: dict[str, Tensor], targets: Any) -> None:
    """Append the labelled predictions and their labels of one batch to ``pairs`` (flattened)."""
    ag = targets.atom_graph
    for key in "efsm":
        p, y = pred.get(key), getattr(targets, key)
        if p is None or y is None:
            continue
        mask = getattr(targets, f"{key}_mask")
        if key == "f" and mask is not None:
            mask = mask.index_select(0, ag)
        if mask is None:
            mask = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
        pairs[f"pred_{key}"].append(p[mask].reshape(-1).double().cpu().numpy())
        pairs[f"true_{key}"].append(y[mask].reshape(-1).double().cpu().numpy())
