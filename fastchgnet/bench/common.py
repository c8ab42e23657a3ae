"""Shared parts of the benchmark harness: structures, environment, timing, memory, kernel
counting, the models compared, tables and JSON records.

Timing conventions of every benchmark: implementations of one case run in the same process, on
the same device, interleaved (ours, ref, ref, ours, ... so neither always runs first), after
warm-up, timed with ``time.perf_counter`` (and ``torch.cuda.synchronize`` on CUDA); rows hold
medians (:func:`timing_fields`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pymatgen.core import Lattice, Structure
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import fastchgnet
from fastchgnet.data.prototypes import make, random_structures
from fastchgnet.device import cpu_info, resolve_device
from fastchgnet.tables import fmt_or_na, text_table  # noqa: F401 (part of the harness API)

__all__ = [
    "BenchStructures", "CIF_LICOO", "CIF_LIMNO2", "bench_device_from_env", "bench_structures",
    "count_cuda_kernels", "device_stats", "environment", "fmt_or_na", "format_environment",
    "graph_counts", "int_list", "is_out_of_memory", "load_our_model", "load_reference",
    "partial_saver", "peak_memory_mib", "quiet", "reference_converter", "resolve_device",
    "save_record", "start_run", "step_memory_mib", "structures_dir", "synced", "text_table",
    "time_call", "time_interleaved", "timing_fields",
]

# The shared CIFs (LiMnO2, Li9Co7O16). Looked up next to the repository, or under
# $FASTCHGNET_BENCH_DATA; the built-in prototypes stand in when they are absent.
CIF_LIMNO2 = "mp-18767-LiMnO2.cif"
CIF_LICOO = "mp-1175469-Li9Co7O16.cif"


# ----------------------------------------------------------------------------------------------
# structures


def structures_dir() -> Path | None:
    """Folder holding the shared benchmark CIFs, or None."""
    candidates = []
    if os.environ.get("FASTCHGNET_BENCH_DATA"):
        candidates.append(Path(os.environ["FASTCHGNET_BENCH_DATA"]))
    root = Path(__file__).resolve().parents[2]
    for base in (root.parent, Path.cwd(), Path.cwd().parent):
        candidates.append(base / "shared" / "data" / "structures")
    for c in candidates:
        if (c / CIF_LIMNO2).is_file() and (c / CIF_LICOO).is_file():
            return c
    return None


def _rattled(s: Structure, rattle: float, strain: float, seed: int) -> Structure:
    rng = np.random.default_rng(seed)
    eps = rng.uniform(-strain, strain, (3, 3))
    eps = (eps + eps.T) / 2
    lat = Lattice(s.lattice.matrix @ (np.eye(3) + eps))
    s = Structure(lat, s.species, s.frac_coords)
    return Structure(s.lattice, s.species, s.cart_coords + rng.normal(0.0, rattle, (len(s), 3)),
                     coords_are_cartesian=True)


@dataclass
class BenchStructures:
    """The structures of the benchmark cases and where they came from."""

    small: Any  # LiMnO2 (8 atoms) or a stand-in
    medium: Any  # Li9Co7O16 (32 atoms) or a stand-in
    large: Any  # 864-atom supercell of ``medium`` (or an 800+ atom stand-in)
    batch: list  # 16 varied structures of 8-32 atoms
    source: str  # "cif" or "prototypes"
    names: tuple[str, str, str]


def bench_structures(n_batch: int = 16) -> BenchStructures:
    """Load the benchmark structures (shared CIFs if present, else built-in prototypes)."""
    folder = structures_dir()
    if folder is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small = Structure.from_file(str(folder / CIF_LIMNO2))
            medium = Structure.from_file(str(folder / CIF_LICOO))
        large = medium.copy()
        large.make_supercell(3)  # 864 atoms
        # 16 varied structures of 8-32 atoms: the two cells and supercells, strained and rattled
        bases = [small, small * (2, 1, 1), small * (1, 3, 1), medium]
        batch = [_rattled(bases[i % len(bases)], 0.03, 0.02, seed=i) for i in range(n_batch)]
        names = (small.composition.reduced_formula, medium.composition.reduced_formula,
                 f"{medium.composition.reduced_formula} 3x3x3")
        return BenchStructures(small, medium, large, batch, "cif", names)

    small = make("rocksalt", ["Mg", "O"])  # 8 atoms (conventional cell)
    medium = make("layered", ["Li", "Co", "O"], supercell=(1, 1, 1), rattle=0.02, seed=3)
    medium = medium * (2, 1, 1) if len(medium) < 20 else medium  # 24 atoms
    large = make("layered", ["Li", "Co", "O"], supercell=(6, 6, 2), rattle=0.02, seed=4)  # 864
    pool = random_structures(8 * n_batch, seed=0, max_atoms=32)
    batch = [s for s in pool if len(s) >= 8][:n_batch]
    names = (small.composition.reduced_formula, medium.composition.reduced_formula,
             f"{medium.composition.reduced_formula} {len(large)} atoms")
    return BenchStructures(small, medium, large, batch, "prototypes", names)


# ----------------------------------------------------------------------------------------------
# environment


def _cpu_name() -> str:
    return cpu_info().get("model name") or platform.processor() or platform.machine()


def _cpu_model() -> str | None:
    """``family F model M`` from /proc/cpuinfo: a VM's "AMD EPYC" can be several generations
    (on the development VMs, family 25 model 1 is Zen 3 with AVX2, family 25 model 17 Zen 4 and
    family 26 Zen 5, both with AVX-512), whose timings and ratios differ."""
    info = cpu_info()
    if "cpu family" in info and "model" in info:
        return f"family {info['cpu family']} model {info['model']}"
    return None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # absent or broken: report as missing
        return None
    return str(getattr(mod, "__version__", "unknown"))


def _pymatgen_version() -> str | None:
    try:
        return package_version("pymatgen")
    except PackageNotFoundError:
        return None


def environment(device: str = "cpu") -> dict[str, Any]:
    """Versions and hardware for a benchmark record."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    env: dict[str, Any] = {
        "fastchgnet": fastchgnet.__version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "chgnet": _version("chgnet"),
        "numpy": np.__version__,
        "pymatgen": _pymatgen_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "cpu": _cpu_name(),
        "cpu_model": _cpu_model(),
        # the vector ISA torch's CPU kernels dispatch to (e.g. AVX2, AVX512)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        env["device_name"] = torch.cuda.get_device_name(idx)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["device_name"] = env["cpu"]
    return env


def format_environment(env: dict) -> str:
    keys = ("device", "device_name", "cpu_count", "torch_threads", "torch", "triton", "chgnet",
            "fastchgnet", "cuda")
    return ", ".join(f"{k}={env[k]}" for k in keys if env.get(k) is not None)


def bench_device_from_env(warn: bool = False) -> str:
    """The benchmark device named by ``FASTCHGNET_BENCH_DEVICE``: ``cpu`` by default, ``cuda``
    (or ``cuda:N``) when set and a GPU is available, else ``cpu`` (with a warning if ``warn``)."""
    want = os.environ.get("FASTCHGNET_BENCH_DEVICE", "cpu").strip().lower() or "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        if warn:
            warnings.warn(f"FASTCHGNET_BENCH_DEVICE={want} but CUDA is not available: using cpu",
                          stacklevel=2)
        return "cpu"
    return want if want.startswith("cuda") else "cpu"


# ----------------------------------------------------------------------------------------------
# measurement


@contextlib.contextmanager
def quiet():
    """Silence stdout and warnings (the reference prints on load and warns on import)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: str) -> float:
    """Milliseconds of one call (device work included)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(
    fns: dict[str, Callable[[], Any]], device: str, repeats: int = 5, warmup: int = 1
) -> dict[str, list[float]]:
    """Time several implementations of one case, alternating their order each round."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            times[n].append(time_call(fns[n], device))
    return times


def timing_fields(times: dict[str, list[float]], repeats: int, warmup: int) -> dict[str, Any]:
    """Row fields from the per-call times (ms) of ``"ours"`` and optionally ``"ref"``."""
    ours_ms = statistics.median(times["ours"])
    ref_ms = statistics.median(times["ref"]) if times.get("ref") else None
    return {
        "ours_ms": ours_ms,
        "ref_ms": ref_ms,
        "ratio": (ref_ms / ours_ms) if ref_ms is not None and ours_ms > 0 else None,
        "ours_min_ms": min(times["ours"]),
        "ref_min_ms": min(times["ref"]) if times.get("ref") else None,
        "ours_ms_all": times["ours"],
        "ref_ms_all": times.get("ref"),
        "repeats": repeats,
        "warmup": warmup,
    }


def peak_memory_mib(fn: Callable[[], Any], device: str) -> float | None:
    """Peak CUDA memory (MiB) allocated during one call, from ``torch.cuda.max_memory_allocated``."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def step_memory_mib(fn: Callable[[], Any], device: str) -> tuple[float | None, float | None]:
    """(peak allocated MiB during one call, the part of it above what was allocated before);
    ``(None, None)`` off CUDA."""
    if not str(device).startswith("cuda"):
        return None, None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak / 2**20, (peak - base) / 2**20


_NOT_KERNELS = ("memcpy", "memset")


def count_cuda_kernels(fn: Callable[[], Any], device: str) -> int | None:
    """CUDA kernels launched by one call, counted with ``torch.profiler``.

    Counts the profiler's device-side events of device type CUDA, minus memcpy/memset records.
    Only ``FunctionEvent.device_type`` and ``profile.events()`` are used: both exist unchanged in
    torch 2.4 through 2.13. Returns None off CUDA or when the profiler cannot trace CUDA.
    """
    if not device.startswith("cuda"):
        return None
    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        events = prof.events() or []
    except Exception as exc:  # no CUPTI, profiler already active, ...
        warnings.warn(f"kernel count unavailable: {exc}", stacklevel=2)
        return None
    n = 0
    for ev in events:
        if getattr(ev, "device_type", None) != DeviceType.CUDA:
            continue
        name = (getattr(ev, "name", "") or "").lower()
        if any(k in name for k in _NOT_KERNELS):
            continue
        n += 1
    return n


def synced(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """``fn`` followed by a device synchronisation (for timers that do not sync, e.g.
    pytest-benchmark's)."""
    if not device.startswith("cuda"):
        return fn

    def run() -> Any:
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def device_stats(fn: Callable[[], Any], device: str) -> dict[str, Any]:
    """Peak CUDA memory (MiB) and CUDA kernels of one call of ``fn``; empty off CUDA."""
    if not device.startswith("cuda"):
        return {}
    return {"peak_mib": peak_memory_mib(fn, device), "cuda_kernels": count_cuda_kernels(fn, device)}


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: ``MemoryError``, CUDA's out-of-memory error, or
    the CPU allocator's "can't allocate memory" (under an address-space cap)."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text


# ----------------------------------------------------------------------------------------------
# the models compared (chgnet, an optional dependency, is imported only when asked for)


def load_our_model(device: str) -> tuple[Any, str]:
    """(model, weights): the CHGNet 0.3.0 weights, or — when they cannot be found (they ship
    with the ``chgnet`` package) — the same architecture with random weights, which runs exactly
    as fast."""
    try:
        return fastchgnet.load_model("0.3.0", device=device), "0.3.0"
    except FileNotFoundError:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = fastchgnet.CHGNet()
        return model.to(device).eval(), "random-init (0.3.0 weights not found)"


def load_reference(device: str) -> Any | None:
    """The reference ``chgnet.model.CHGNet`` (0.3.0) on ``device``, or None if chgnet is absent."""
    try:
        with quiet():
            from chgnet.model import CHGNet as RefCHGNet

            return RefCHGNet.load(model_name="0.3.0", verbose=False, use_device=device)
    except ImportError:
        return None


def reference_converter() -> Any | None:
    """chgnet's ``CrystalGraphConverter`` (6 Å atom graph, 3 Å bond graph), or None."""
    try:
        with quiet():
            from chgnet.graph import CrystalGraphConverter
        return CrystalGraphConverter(atom_graph_cutoff=6, bond_graph_cutoff=3)
    except ImportError:
        return None


def graph_counts(graphs: list) -> dict[str, int]:
    """Atoms, undirected and directed bonds, angles of our graphs (summed)."""
    return {
        "atoms": sum(g.n_atoms for g in graphs),
        "bonds": sum(g.n_bonds for g in graphs),
        "directed_bonds": sum(g.n_directed_bonds for g in graphs),
        "angles": sum(g.n_angles for g in graphs),
    }


# ----------------------------------------------------------------------------------------------
# tables and records


def start_run(device: str, threads: int | None = None, stream: Any = None) -> tuple[str, dict]:
    """Start of a command-line benchmark: resolve the device, set the torch thread count (the
    process is the benchmark's), print the environment line; returns ``(device, environment)``."""
    device = resolve_device(device)
    if threads is not None:
        torch.set_num_threads(int(threads))
    env = environment(device)
    print(f"# {format_environment(env)}", file=stream or sys.stdout, flush=True)
    return device, env


def int_list(text: str | None) -> list[int] | None:
    """``"4,8"`` -> ``[4, 8]``; None or empty -> None (the command's default)."""
    return [int(b) for b in text.split(",") if b.strip()] if text else None


def partial_saver(path: str | Path | None, env: dict, settings: dict,
                  t0: float) -> Callable[[list[dict]], None] | None:
    """An ``on_row`` callback that rewrites the record at ``path`` with the rows so far (marked
    ``"partial": true``), so a run stopped by a time limit keeps what it measured; None without
    a path."""
    if not path:
        return None

    def save(rows: list[dict]) -> None:
        save_record(path, env, {**settings, "partial": True}, time.perf_counter() - t0, rows,
                    sys.stderr)

    return save


def save_record(path: str | Path, env: dict, settings: dict, wall_s: float, rows: list[dict],
                stream: Any = None) -> Path:
    """Write a benchmark record ``{environment, settings, wall_s, rows}`` as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, "settings": settings, "wall_s": wall_s, "rows": rows}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"# saved {path}", file=stream or sys.stdout)
    return path
