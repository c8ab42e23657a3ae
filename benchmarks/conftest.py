"""Fixtures of the fastchgnet benchmarks (pytest-benchmark), ours vs the reference chgnet.

Run with ``python -m pytest benchmarks --benchmark-only`` (see README.md). The device comes from
``FASTCHGNET_BENCH_DEVICE`` (``cpu`` by default; ``cuda`` when set and a GPU is available);
``FASTCHGNET_BENCH_THREADS`` sets the torch intra-op threads.

Every case is parametrised by ``impl`` (``chgnet``, ``ours``) and both tests of a case share a
benchmark group, so they are listed side by side. The ratio ``chgnet median / ours median`` is put
into the ``extra_info`` of both as soon as both have run (see :class:`RatioBook`), and printed in
a summary table at the end of the session.

Every case also records the thread setting it ran with (torch intra-op threads, ``OMP_WAIT_POLICY``
and ``OMP_NUM_THREADS``; ``"unset"`` for libgomp's defaults) in its ``extra_info``, and the run
records it in the JSON's ``machine_info["fastchgnet_runtime"]``: a 2-thread run on a shared
machine with libgomp's default wait policy can be many times slower (docs/performance.md,
"Threads").
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from fastchgnet.bench.common import _cpu_model  # noqa: E402  (the processor generation)
from fastchgnet.bench.common import (
    bench_device_from_env,
    bench_structures,
    environment,
    format_environment,
    load_our_model,
    load_reference,
    reference_converter,
)

# the cases time the eager and the compiled model call each on purpose: the ASE calculator's
# compile="auto" default (eager, then compiled after 60 s of model calls) must not switch a
# case from one to the other in the middle of a run (an explicit FASTCHGNET_COMPILE is kept)
os.environ.setdefault("FASTCHGNET_COMPILE", "never")

DEVICE = bench_device_from_env(warn=True)
# FASTCHGNET_BENCH_THREADS: torch intra-op threads for the run (default: torch's own setting)
if os.environ.get("FASTCHGNET_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTCHGNET_BENCH_THREADS"]))


def runtime_setting() -> dict[str, object]:
    """The thread setting of this run (see the module docstring)."""
    return {"torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset")}


def pytest_report_header(config: pytest.Config) -> list[str]:
    rt = runtime_setting()
    return [f"fastchgnet benchmarks: {format_environment(environment(DEVICE))}",
            f"threads: torch {rt['torch_threads']}, OMP_WAIT_POLICY {rt['omp_wait_policy']}, "
            f"OMP_NUM_THREADS {rt['omp_num_threads']}"]


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["fastchgnet_runtime"] = runtime_setting()
    machine_info["fastchgnet_cpu_model"] = _cpu_model()  # "AMD EPYC" spans several generations


@pytest.fixture(autouse=True)
def _record_runtime(request: pytest.FixtureRequest) -> None:
    """Put the thread setting into the ``extra_info`` of every benchmark case."""
    if "benchmark" in request.fixturenames:
        request.getfixturevalue("benchmark").extra_info.update(runtime_setting())


# ----------------------------------------------------------------------------------------------
# ratios


class RatioBook:
    """Medians per (group, impl); fills ``ratio`` in both tests' ``extra_info`` once both ran."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, tuple[float, dict]]] = {}

    def record(self, benchmark: Any, impl: str) -> None:
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # benchmarks disabled (--benchmark-disable): nothing measured
            return
        median = float(stats.stats.median)
        info = benchmark.extra_info
        info["impl"] = impl
        info["median_ms"] = median * 1e3
        group = benchmark.group or benchmark.name
        book = self.entries.setdefault(group, {})
        book[impl] = (median, info)
        if "chgnet" in book and "ours" in book:
            ratio = book["chgnet"][0] / book["ours"][0]
            for _, extra in book.values():
                extra["ratio"] = ratio  # chgnet / ours: > 1 means fastchgnet is faster

    def summary(self) -> list[str]:
        lines = []
        for group, book in self.entries.items():
            ours = book.get("ours", (None, {}))[0]
            ref = book.get("chgnet", (None, {}))[0]
            ratio = f"{ref / ours:8.2f}x" if ours and ref else "     n/a"
            fmt = (lambda v: f"{v * 1e3:10.2f}" if v is not None else "       n/a")
            lines.append(f"{group:<34s} {fmt(ours)} {fmt(ref)} {ratio}")
        if lines:
            lines.insert(0, f"{'group':<34s} {'ours ms':>10s} {'chgnet ms':>10s} {'ratio':>9s}")
        return lines


_BOOK = RatioBook()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines = _BOOK.summary()
    if lines:
        terminalreporter.section(f"fastchgnet vs chgnet (median, device {DEVICE}, ratio = chgnet/ours)")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def ratio_book() -> RatioBook:
    return _BOOK


# ----------------------------------------------------------------------------------------------
# devices, structures, models


@pytest.fixture(scope="session")
def device() -> str:
    return DEVICE


@pytest.fixture(scope="session")
def structures():
    """:class:`fastchgnet.bench.common.BenchStructures` (shared CIFs, else built-in prototypes)."""
    return bench_structures()


@pytest.fixture(scope="session")
def our_model(device: str):
    return load_our_model(device)[0]


@pytest.fixture(scope="session")
def ref_model(device: str):
    ref = load_reference(device)
    if ref is None:
        pytest.skip("chgnet is not installed")
    return ref


@pytest.fixture(scope="session")
def ref_converter():
    conv = reference_converter()
    if conv is None:
        pytest.skip("chgnet is not installed")
    return conv
