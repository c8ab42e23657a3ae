"""The benchmark harness: fastchgnet against the reference ``chgnet``, one module per benchmark.

* :mod:`~fastchgnet.bench.common` — shared helpers: structures, environment, interleaved timing,
  peak memory, CUDA kernel counts, the models compared, text tables, JSON records;
* :mod:`~fastchgnet.bench.predict` — graph construction and ``predict`` (``fastchgnet bench``);
* :mod:`~fastchgnet.bench.train_step` — one training step (``python -m fastchgnet.bench.train_step``);
* :mod:`~fastchgnet.bench.trainer_epochs` — whole ``Trainer`` epochs against chgnet's Trainer;
* :mod:`~fastchgnet.bench.md` — one MD step through the ASE calculators, and the largest cell;
* :mod:`~fastchgnet.bench.memory` — peak tensor memory of a training step and an MD step;
* :mod:`~fastchgnet.bench.scaling` — data-parallel scaling prediction from measured step times;
* :mod:`~fastchgnet.bench.train_data` — the labelled MPtrj-like batches of the training benchmarks.

The library never imports this package (the command line does). The names of the former
``fastchgnet.bench`` module are still offered here, loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_COMMON = (
    "BenchStructures", "bench_device_from_env", "bench_structures", "count_cuda_kernels",
    "device_stats", "environment", "fmt_or_na", "format_environment", "graph_counts", "int_list",
    "is_out_of_memory", "load_our_model", "load_reference", "partial_saver", "peak_memory_mib",
    "quiet", "reference_converter", "resolve_device", "save_record", "start_run",
    "step_memory_mib", "structures_dir", "synced", "text_table", "time_call", "time_interleaved",
    "timing_fields",
)
_PREDICT = ("format_table", "main_bench", "run_bench")
_SUBMODULES = ("common", "md", "memory", "predict", "scaling", "train_data", "train_step",
               "trainer_epochs")
_EXPORTS = {**{n: "common" for n in _COMMON}, **{n: "predict" for n in _PREDICT}}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
