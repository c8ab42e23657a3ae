"""chgnet's ``chgnet.utils.common_utils``: device choice and small file and metric helpers."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

__all__ = ["AverageMeter", "cuda_devices_sorted_by_free_mem", "determine_device", "mae", "mkdir",
           "read_json", "write_json"]


def determine_device(use_device: str | None = None, *, check_cuda_mem: bool = False) -> str:
    """The device chgnet would pick: ``use_device``, else ``$CHGNET_DEVICE``, else MPS when torch
    has it, else CUDA when available, else the CPU. ``check_cuda_mem``: the CUDA device with the
    most free memory (``cuda:N``) instead of the current one."""
    use_device = use_device or os.getenv("CHGNET_DEVICE")
    mps = getattr(torch.backends, "mps", None)
    if use_device in ("mps", None) and mps is not None and mps.is_available():
        return "mps"
    device = use_device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and check_cuda_mem:
        order = cuda_devices_sorted_by_free_mem()
        if order:
            device = f"cuda:{order[-1]}"
    return device


def cuda_devices_sorted_by_free_mem() -> list[int]:
    """CUDA device indices, least free memory first (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    return sorted(range(len(free)), key=free.__getitem__)


class AverageMeter:
    """Running average: ``update(val, n)`` adds ``val`` ``n`` times; ``val``, ``sum``, ``count``,
    ``avg``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.val = self.avg = self.sum = self.count = 0.0

    def update(self, val: float, n: int = 1) -> None:
        self.val = val
        self.sum += val * n
        self.count += n
        if self.count:
            self.avg = self.sum / self.count


def mae(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error."""
    return (target - prediction).abs().mean()


def read_json(filepath: str) -> dict:
    with open(filepath) as fh:
        return json.load(fh)


def _plain(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def write_json(dct: dict, filepath: str) -> None:
    """Write ``dct`` as JSON; numpy scalars and arrays become numbers and lists."""
    with open(filepath, "w") as fh:
        json.dump(dct, fh, default=_plain)


def mkdir(path: str) -> str:
    """Create the folder ``path`` (and its parents) unless it exists; returns ``path``."""
    if os.path.exists(path):
        print("Folder exists")
    else:
        os.makedirs(path)
    return path
