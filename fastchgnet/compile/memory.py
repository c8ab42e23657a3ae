"""What compiling a training step cost on this machine before: a small record kept beside
Inductor's on-disk cache.

Compiling the exact model's training step (forward, forces by ``torch.func.grad``, the second-order
backward) takes about two minutes on a 2-core CPU the first time; Inductor keeps the compiled
code in its on-disk cache, and the next compilation of the same step loads it in seconds. The
trainer's ``auto`` policy (:mod:`fastchgnet.compile.train`) cannot see that from outside, so after
a compiled step it writes here, per step key (:func:`step_key`), how long the compilation took
and how much faster the compiled steps were; a later run with the same key reads it
(:func:`recall`) and compiles at its first steps when the measured saving pays for the
measured compilation.

The record lives in Inductor's cache folder (``$TORCHINDUCTOR_CACHE_DIR``, by default
``/tmp/torchinductor_<user>``), so deleting that folder deletes both, and nothing is recalled
while Inductor's caches are switched off. It is written atomically (a temporary file renamed);
concurrent runs each leave a valid file (the last writer's).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["COLD_TO_WARM", "FILE", "cache_misses", "expected_cost", "recall", "record_path", "remember",
           "step_key"]

log = logging.getLogger("fastchgnet")

#: the record's file name inside Inductor's cache folder
FILE = "fastchgnet-compiled-steps.json"
#: a compilation that loads from Inductor's cache, as a fraction of the first one (exact model's
#: training step, 2-core AMD EPYC Zen 5: 5-8 s against 100-110 s)
COLD_TO_WARM = 0.1


def record_path() -> Path | None:
    """The record file, or None where Inductor's on-disk caches are off or unknown."""
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except Exception:  # an Inductor without these pieces
        return None
    if getattr(inductor_config, "force_disable_caches", False) \
            or not getattr(inductor_config, "fx_graph_cache", True):
        return None
    # as Inductor's cache_dir(), without its side effects (it sets the variable, makes the folder)
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    return Path(os.path.abspath(folder)) / FILE


def step_key(model: torch.nn.Module, task: str = "efsm", **extra: Any) -> str:
    """A key for the compiled training step of ``model``: its class, output stage, configuration,
    parameter dtype and device type, the task, the torch and fastchgnet versions, and the torch
    thread count (Inductor's CPU kernels are compiled for it, so another count compiles anew)
    — what decides the compiled code; ``extra``: anything else that does."""
    config = getattr(model, "config", None)
    param = next(model.parameters(), None)
    parts = {
        "model": type(model).__qualname__,
        "output": type(getattr(model, "output", None)).__qualname__,
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config),
        "dtype": str(param.dtype) if param is not None else None,
        "device": param.device.type if param is not None else None,
        "task": task, "torch": torch.__version__, "fastchgnet": _version(),
        "threads": torch.get_num_threads(), **extra,
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _version() -> str | None:
    """fastchgnet's installed version (the package itself is a room above this one)."""
    try:
        return importlib.metadata.version("fastchgnet")
    except importlib.metadata.PackageNotFoundError:
        return None


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cache_misses() -> int:
    """Inductor and AOTAutograd cache misses so far in this process (a compilation that missed
    compiled from scratch)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_miss"]
               + counters["aot_autograd"]["autograd_cache_miss"])


def expected_cost(entry: dict[str, Any]) -> float | None:
    """Seconds a compilation of a recalled step should take now: the measured time when that
    compilation loaded from Inductor's cache; :data:`COLD_TO_WARM` of it after a compilation from
    scratch (which filled the cache); None when a compilation expected to load from the cache
    compiled from scratch instead (the cache does not keep it: do not count on it)."""
    if entry.get("from_cache"):
        return float(entry["compile_s"])
    if entry.get("expected_cached"):
        return None
    return COLD_TO_WARM * float(entry["compile_s"])


def recall(key: str) -> dict[str, Any] | None:
    """What an earlier compilation of step ``key`` on this machine cost (``compile_s``) and gave
    (``speedup``: eager / compiled step time, None if not measured), or None."""
    path = record_path()
    if path is None:
        return None
    entry = _read(path).get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("compile_s"), (int, float)):
        return None
    return entry


def remember(key: str, compile_s: float, speedup: float | None, *, from_cache: bool,
             expected_cached: bool = False) -> None:
    """Record (replacing any earlier entry) what compiling step ``key`` cost (``compile_s``, the
    first compiled step), gave (``speedup``) and whether it loaded from Inductor's cache
    (``from_cache``; ``expected_cached``: it was made because a record said it would). Never
    raises: a record that cannot be written only means a later run decides without it."""
    path = record_path()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        data[key] = {"compile_s": round(float(compile_s), 2),
                     "speedup": None if speedup is None else round(float(speedup), 3),
                     "from_cache": bool(from_cache), "expected_cached": bool(expected_cached),
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=FILE, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("could not write %s: %s", path, exc)
