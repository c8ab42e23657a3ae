"""Side-by-side speed benchmark of fastchgnet against the reference ``chgnet`` package.

Every case times our implementation and the reference in the same process, on the same device,
interleaved (ours, ref, ref, ours, ... so neither always runs first), after warm-up, with
``time.perf_counter`` (and ``torch.cuda.synchronize`` on CUDA). A row holds medians and the ratio
``ref_ms / ours_ms`` (> 1 means we are faster). On CUDA a row also holds the peak memory of one
call (``torch.cuda.max_memory_allocated`` after a reset) and the CUDA kernels launched by one call
(counted with ``torch.profiler``).

Used by ``fastchgnet bench`` and ``fastchgnet demo``; ``benchmarks/`` has the pytest-benchmark
version of the same cases.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

# The shared CIFs (LiMnO2, Li9Co7O16). Looked up next to the repository, or under
# $FASTCHGNET_BENCH_DATA; the built-in prototypes stand in when they are absent.
_CIF_LIMNO2 = "mp-18767-LiMnO2.cif"
_CIF_LICOO = "mp-1175469-Li9Co7O16.cif"


def structures_dir() -> Path | None:
    """Folder holding the shared benchmark CIFs, or None."""
    candidates = []
    if os.environ.get("FASTCHGNET_BENCH_DATA"):
        candidates.append(Path(os.environ["FASTCHGNET_BENCH_DATA"]))
    root = Path(__file__).resolve().parents[1]
    for base in (root.parent, Path.cwd(), Path.cwd().parent):
        candidates.append(base / "shared" / "data" / "structures")
    for c in candidates:
        if (c / _CIF_LIMNO2).is_file() and (c / _CIF_LICOO).is_file():
            return c
    return None


def _rattled(s: Any, rattle: float, strain: float, seed: int) -> Any:
    from pymatgen.core import Lattice, Structure

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
        from pymatgen.core import Structure

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small = Structure.from_file(str(folder / _CIF_LIMNO2))
            medium = Structure.from_file(str(folder / _CIF_LICOO))
        large = medium.copy()
        large.make_supercell(3)  # 864 atoms
        # 16 varied structures of 8-32 atoms: the two cells and supercells, strained and rattled
        bases = [small, small * (2, 1, 1), small * (1, 3, 1), medium]
        batch = [_rattled(bases[i % len(bases)], 0.03, 0.02, seed=i) for i in range(n_batch)]
        names = (small.composition.reduced_formula, medium.composition.reduced_formula,
                 f"{medium.composition.reduced_formula} 3x3x3")
        return BenchStructures(small, medium, large, batch, "cif", names)

    from fastchgnet.data.prototypes import make, random_structures

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


def resolve_device(device: str | None) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda`` without a GPU raises."""
    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    return device


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # absent or broken: report as missing
        return None
    return str(getattr(mod, "__version__", "unknown"))


def environment(device: str = "cpu") -> dict[str, Any]:
    """Versions and hardware for a benchmark record."""
    import fastchgnet

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


def _pymatgen_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("pymatgen")
    except Exception:
        return None


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


def peak_memory_mib(fn: Callable[[], Any], device: str) -> float | None:
    """Peak CUDA memory (MiB) allocated during one call, from ``torch.cuda.max_memory_allocated``."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


_NOT_KERNELS = ("memcpy", "memset")


def count_cuda_kernels(fn: Callable[[], Any], device: str) -> int | None:
    """CUDA kernels launched by one call, counted with ``torch.profiler``.

    Counts the profiler's device-side events of device type CUDA, minus memcpy/memset records.
    Only ``FunctionEvent.device_type`` and ``profile.events()`` are used: both exist unchanged in
    torch 2.4 through 2.13. Returns None off CUDA or when the profiler cannot trace CUDA.
    """
    if not device.startswith("cuda"):
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

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


# ----------------------------------------------------------------------------------------------
# the benchmark


@dataclass
class _Case:
    name: str
    kind: str  # "graph" or "predict"
    n_structures: int
    n_atoms: int
    ours: Callable[[], Any]
    ref: Callable[[], Any] | None
    extra: dict


def load_our_model(device: str) -> tuple[Any, str]:
    """(model, weights): the CHGNet 0.3.0 weights, or — when they cannot be found (they ship
    with the ``chgnet`` package) — the same architecture with random weights, which runs exactly
    as fast."""
    import fastchgnet

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


def _cases(device: str, quick: bool, model: Any, ref: Any | None, conv: Any | None,
           structs: BenchStructures) -> list[_Case]:
    from fastchgnet.data.graph import build_graph

    cases: list[_Case] = []
    graph_inputs = [(f"graph {structs.names[2]}", structs.large),
                    (f"graph {structs.names[0]}", structs.small),
                    (f"graph {structs.names[1]}", structs.medium)]
    for name, s in graph_inputs:
        g = build_graph(s)
        extra = graph_counts([g])
        if conv is not None:
            with quiet():
                rg = conv(s)
            extra["ref_directed_bonds"] = int(rg.atom_graph.shape[0])
            extra["ref_angles"] = int(rg.bond_graph.shape[0])
            extra["same_graph_size"] = (extra["ref_directed_bonds"] == extra["directed_bonds"]
                                        and extra["ref_angles"] == extra["angles"])
        cases.append(_Case(name, "graph", 1, len(s), (lambda s=s: build_graph(s)),
                           (lambda s=s: conv(s)) if conv is not None else None, extra))

    def predict_case(name: str, items: list, task: str, bs: int) -> _Case:
        counts = graph_counts([build_graph(s) for s in items])
        extra = {**counts, "task": task, "batch_size": bs, "dtype": str(next(model.parameters()).dtype)}

        def ours() -> Any:
            return model.predict(items, task=task, batch_size=bs)

        def reference() -> Any:
            with quiet():
                return ref.predict_structure(items, task=task, batch_size=bs)

        return _Case(name, "predict", len(items), counts["atoms"], ours,
                     reference if ref is not None else None, extra)

    n = len(structs.batch)
    for task in ("e", "efsm"):
        for bs in (1, 16):
            cases.append(predict_case(f"predict {task} {n}x b{bs}", structs.batch, task, bs))
    if not quick:
        for label, s in ((structs.names[0], structs.small), (structs.names[1], structs.medium)):
            cases.append(predict_case(f"predict efsm {label}", [s], "efsm", 1))
    return cases


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


def run_bench(
    device: str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    quick: bool = False,
    *,
    reference: bool = True,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Run all cases; one dict per case (see the module docstring).

    Args:
        device: ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``) or ``"auto"``.
        repeats: timed calls per implementation and case (medians are reported).
        warmup: untimed calls per implementation and case first.
        quick: fewer repeats (at most 2) and no single-structure prediction cases.
        reference: also time the reference ``chgnet`` when it is installed.
        threads: torch intra-op threads for the run (restored afterwards); None keeps the current
            setting. On a shared machine 1 thread is far less noisy than oversubscribed threads.
        progress: called with each case's name before it runs (e.g. ``print``).
    """
    device = resolve_device(device)
    if threads is not None:
        old = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return run_bench(device, repeats, warmup, quick, reference=reference, threads=None,
                             progress=progress)
        finally:
            torch.set_num_threads(old)
    if quick:
        repeats = min(repeats, 2)
    repeats = max(1, int(repeats))
    warmup = max(0, int(warmup))
    model, weights = load_our_model(device)
    ref = load_reference(device) if reference else None
    conv = reference_converter() if reference else None
    structs = bench_structures()

    rows: list[dict] = []
    for case in _cases(device, quick, model, ref, conv, structs):
        if progress is not None:
            progress(case.name)
        fns = {"ours": case.ours}
        if case.ref is not None:
            fns["ref"] = case.ref
        times = time_interleaved(fns, device, repeats=repeats, warmup=warmup)
        row: dict[str, Any] = {
            "case": case.name,
            "kind": case.kind,
            "device": device,
            "n_structures": case.n_structures,
            "n_atoms": case.n_atoms,
            **timing_fields(times, repeats, warmup),
            "structures": structs.source,
            "weights": weights,
            "torch_threads": torch.get_num_threads(),
            **case.extra,
        }
        if device.startswith("cuda"):
            # graph construction runs on the host in both implementations: no device numbers
            on_device = case.kind == "predict"
            row["ours_peak_mib"] = peak_memory_mib(case.ours, device) if on_device else None
            row["ref_peak_mib"] = (peak_memory_mib(case.ref, device)
                                   if on_device and case.ref is not None else None)
            row["ours_kernels"] = count_cuda_kernels(case.ours, device) if on_device else None
            row["ref_kernels"] = (count_cuda_kernels(case.ref, device)
                                  if on_device and case.ref is not None else None)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# output


def fmt_or_na(v: Any, spec: str) -> str:
    """``format(v, spec)``, or ``"n/a"`` for a missing value."""
    if v is None:
        return "n/a"
    return format(v, spec)


def text_table(head: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: a header, a rule, the rows; first column left-aligned, others right."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


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


def format_table(rows: list[dict]) -> str:
    """A plain-text table of benchmark rows (CUDA columns only when a row has them)."""
    cuda = any("ours_peak_mib" in r for r in rows)
    head = ["case", "structs", "atoms", "ours ms", "ref ms", "ref/ours"]
    if cuda:
        head += ["ours MiB", "ref MiB", "ours kern", "ref kern"]
    body = []
    for r in rows:
        line = [r["case"], str(r["n_structures"]), str(r["n_atoms"]), fmt_or_na(r["ours_ms"], ".2f"),
                fmt_or_na(r.get("ref_ms"), ".2f"),
                "n/a" if r.get("ratio") is None else f"{r['ratio']:.2f}x"]
        if cuda:
            line += [fmt_or_na(r.get("ours_peak_mib"), ".1f"), fmt_or_na(r.get("ref_peak_mib"), ".1f"),
                     fmt_or_na(r.get("ours_kernels"), "d"), fmt_or_na(r.get("ref_kernels"), "d")]
        body.append(line)
    return text_table(head, body)


def format_environment(env: dict) -> str:
    keys = ("device", "device_name", "cpu_count", "torch_threads", "torch", "triton", "chgnet",
            "fastchgnet", "cuda")
    return ", ".join(f"{k}={env[k]}" for k in keys if env.get(k) is not None)


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


def main_bench(device: str = "auto", repeats: int = 5, warmup: int = 1, quick: bool = False,
               json_path: str | None = None, threads: int | None = None,
               stream: Any = None) -> list[dict]:
    """Run, print the table (and environment), optionally save ``{environment, rows}`` as JSON."""
    stream = stream or sys.stdout
    device, env = start_run(device, threads, stream)
    t0 = time.perf_counter()
    rows = run_bench(device, repeats=repeats, warmup=warmup, quick=quick,
                     progress=lambda name: print(f"  running {name} ...", file=sys.stderr, flush=True))
    wall = time.perf_counter() - t0
    print(format_table(rows), file=stream)
    ref_note = "" if any(r.get("ref_ms") is not None for r in rows) else " (chgnet not installed)"
    done = rows[0]["repeats"] if rows else repeats
    print(f"# medians of {done} interleaved calls after {warmup} warm-up; "
          f"ratio = ref/ours{ref_note}; "
          f"structures: {rows[0]['structures'] if rows else '?'}; total {wall:.1f} s",
          file=stream)
    if json_path:
        save_record(json_path, env, {"repeats": repeats, "warmup": warmup, "quick": quick,
                                     "threads": threads}, wall, rows, stream)
    return rows


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: ``MemoryError``, CUDA's out-of-memory error, or
    the CPU allocator's "can't allocate memory" (under an address-space cap)."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text


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
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, "settings": settings, "wall_s": wall_s, "rows": rows}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"# saved {path}", file=stream or sys.stdout)
    return path
