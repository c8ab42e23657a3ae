"""Choosing the device a job runs on."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device | None) -> str:
    """``auto`` (or None) -> ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU raises."""
    device = str(device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    return device
