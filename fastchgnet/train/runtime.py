"""Process-level state a training run touches: matmul precision, the random-number generators (saved
in the checkpoint for an exact resume) and the DDP wrapper of a distributed run."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["precision_context", "rng_state", "set_rng_state", "wrap_ddp"]


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """TF32 matmuls for the duration of a run (restored afterwards; nothing global on import)."""
    if precision != "tf32":
        yield
        return
    if device.type != "cuda":
        raise ValueError("precision tf32 needs a CUDA device (TF32 is a GPU tensor-core format)")
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rng_state(device: torch.device) -> dict[str, Any]:
    """The torch generator state (and the CUDA one of ``device``), for :func:`set_rng_state`."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def wrap_ddp(model: nn.Module, bucket_mb: float | None = None) -> nn.Module:
    """``model`` in DistributedDataParallel (the process group must exist).

    ``find_unused_parameters``: some parameters get no gradient in a step (the last block's angle
    update always; the bond-graph parameters when no structure of the batch has an angle). DDP
    then finds them by walking the step's autograd graph and leaves the gradient of a parameter
    unused on every rank at None, as a single process would (so Adam skips it the same way).
    Buffers are synced once, at construction (they do not change in training), not every step;
    ``bucket_mb`` sets the gradient bucket size (None: torch's default).
    """
    DDP = nn.parallel.DistributedDataParallel
    kw: dict[str, Any] = {} if bucket_mb is None else {"bucket_cap_mb": bucket_mb}
    if "forward_sync_buffers" in inspect.signature(DDP).parameters:
        kw["forward_sync_buffers"] = False
    else:  # older torch
        kw["broadcast_buffers"] = False
    return DDP(model, device_ids=None, find_unused_parameters=True, **kw)
