"""Choosing the device a job runs on, the CPU floating-point mode of our own calls, and what the
host processor is."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["cpu_info", "flush_denormals", "flushing_denormals", "resolve_device"]


def resolve_device(device: str | torch.device | None) -> str:
    """``auto`` (or None) -> ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU raises."""
    device = str(device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    return device


def flushing_denormals() -> bool:
    """Whether this thread flushes float denormals to zero (torch has a setter, no getter: a
    float32 conversion of 1e-39, a denormal, reads back as zero exactly then)."""
    return float(torch.tensor(1e-39, dtype=torch.float32)) == 0.0


@contextmanager
def flush_denormals(device: str | torch.device | None = "cpu") -> Iterator[None]:
    """Flush float denormals to zero (``torch.set_flush_denormal``) for the calling thread inside
    the scope, on the CPU; the previous setting is restored at exit (nothing changes globally).

    With the 0.3.0 weights, the SiLU gradient of strongly negative pre-activations underflows
    (1.5 % of its values in a 64-atom Si force call), and sums and copies carry the denormals on.
    Processors that handle denormals in microcode slowed all three CHGNet implementations by
    1.3-1.4x (issue 19); on the AMD Zen 5 development machine they cost nothing measurable.
    Flushed values are below 1.2e-38: the outputs are unchanged to float32 precision.
    """
    if torch.device(device or "cpu").type != "cpu" or flushing_denormals():
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, str]:
    """The first processor's ``vendor_id``, ``cpu family``, ``model`` and ``model name`` from
    /proc/cpuinfo (the keys found; empty where there is no such file). Read once per process."""
    wanted = ("vendor_id", "cpu family", "model", "model name")
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if not line.strip():
                    break  # the end of the first processor's block
                key = line.split(":", 1)[0].strip()
                if key in wanted and key not in found:
                    found[key] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return found
