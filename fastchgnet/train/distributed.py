"""Data-parallel training over ``torch.distributed``: launch detection, set-up, the global loss.

A run is distributed when it is launched with more than one process by ``torchrun`` (or
``python -m torch.distributed.run``), which sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; or by SLURM's ``srun`` with one task per GPU
(``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_LOCALID``) when ``MASTER_ADDR`` and ``MASTER_PORT`` are
exported. Anything else (no such variables, or a world of one) is an ordinary single-process run
and nothing here changes it.

Backends: NCCL on CUDA (rank ``r`` uses ``cuda:LOCAL_RANK``), gloo on the CPU. Every collective
runs under the process group's ``timeout``: a rank that dies or hangs makes the others fail with
an error instead of waiting for ever.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from fastchgnet.train.loss import TARGET_KEYS, _terms

__all__ = ["DistEnv", "DistributedTrainingError", "global_loss", "init_distributed", "launch_env",
           "rank_ordered", "shutdown"]

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800.0


class DistributedTrainingError(RuntimeError):
    """A distributed run stopped: a rank died, hung past the timeout, or failed."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a distributed run."""

    world_size: int
    rank: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` over the ranks, in place; returns it."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()


def launch_env(environ: dict[str, str] | None = None) -> tuple[int, int, int] | None:
    """``(world_size, rank, local_rank)`` of a multi-process launch, or None for a single process."""
    env = os.environ if environ is None else environ
    try:
        if "WORLD_SIZE" in env and "RANK" in env:
            world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
            local = int(env.get("LOCAL_RANK", rank))
        elif "SLURM_NTASKS" in env and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
            world, rank = int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"])
            local = int(env.get("SLURM_LOCALID", 0))
        else:
            return None
    except ValueError as exc:
        raise ValueError(f"malformed launcher environment (WORLD_SIZE/RANK/LOCAL_RANK): {exc}") from None
    if world < 2:
        return None
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return world, rank, local


def init_distributed(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv | None:
    """Join the process group of a torchrun/SLURM launch; None when not launched distributed.

    ``device``: ``auto`` (CUDA when available), ``cuda`` or ``cpu``; on CUDA the rank takes GPU
    ``LOCAL_RANK`` and the NCCL backend, on the CPU gloo. ``timeout_s`` bounds every collective.
    """
    launch = launch_env()
    if launch is None:
        return None
    world, rank, local = launch
    kind = device.split(":")[0]
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("distributed run on --device cuda, but CUDA is not available")
        n_gpu = torch.cuda.device_count()
        if local >= n_gpu:
            raise ValueError(f"LOCAL_RANK={local} but this node has {n_gpu} GPUs: start at most "
                             f"{n_gpu} processes per node (torchrun --nproc_per_node)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif kind == "cpu":
        dev, backend = torch.device("cpu"), "gloo"
    else:
        raise ValueError(f"distributed training supports cpu and cuda devices, not {device!r}")
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise ValueError("distributed launch without MASTER_ADDR/MASTER_PORT: use torchrun, or "
                         "export them in the SLURM script (see docs/distributed.md)")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(world, rank, local, dev, backend)


def shutdown(env: DistEnv | None) -> None:
    """Leave the process group (after the last collective)."""
    if env is not None and dist.is_initialized():
        dist.destroy_process_group()


def rank_ordered(env: DistEnv | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 first, then on the first rank of every node, then on all others.

    For work with a shared result on disk, e.g. building the graph cache: rank 0 builds it, the
    other ranks open it; a node whose cache root is not shared builds its own copy once.
    """
    if env is None:
        return fn()
    out = fn() if env.is_main else None
    env.barrier()
    if not env.is_main and env.local_rank == 0:
        out = fn()
    env.barrier()
    if out is None:
        out = fn()
    return out  # type: ignore[return-value]


def global_loss(loss_fn: Any, pred: dict[str, Tensor], targets: Any,
                env: DistEnv) -> tuple[Tensor, Tensor]:
    """This rank's share of the loss of the whole global batch.

    Each target's masked mean is taken over the labels of *all* ranks (one all-reduce of four
    counts), so with ranks holding different numbers of structures or atoms the averaged DDP
    gradient equals the gradient of a single process on the global batch. Returns
    ``(loss to back-propagate, share)``: ``share`` summed over the ranks is the global batch's loss;
    the loss to back-propagate is ``world_size * share`` (DDP averages the gradients).
    """
    ref = next(v for v in pred.values() if isinstance(v, Tensor))
    zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
    sums = [zero] * len(TARGET_KEYS)
    counts = torch.zeros(len(TARGET_KEYS), dtype=torch.float64, device=ref.device)
    for key, p, y, mask in _terms(pred, targets, None):
        i = TARGET_KEYS.index(key)
        err = loss_fn.elementwise(p, y)
        sums[i] = torch.where(mask, err, torch.zeros_like(err)).sum()
        counts[i] = mask.sum()
    env.all_reduce(counts)
    counts = counts.clamp_min(1).to(ref.dtype)
    weights = torch.tensor([loss_fn.prefactors[k] for k in TARGET_KEYS], dtype=ref.dtype,
                           device=ref.device)
    share = (torch.stack(sums) / counts * weights).sum()
    return share * env.world_size, share.detach()

