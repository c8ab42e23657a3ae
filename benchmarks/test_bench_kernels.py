"""Fused Triton ops vs their plain-torch references (eager and ``torch.compile``); CUDA only.

Ops (the Triton kernels of ``fastchgnet.kernels``, called directly rather than through the
dispatchers of ``fastchgnet.nn.fused``) and their references (``fastchgnet.nn.functional``):

* ``radial_bases``: both smooth radial Bessel bases (6 Å and 3 Å cutoffs, K = 31, envelope p = 8)
  of ~150k undirected bond lengths;
* ``angle_basis``: gather of both legs, dot product, arccos and Fourier expansion (K = 15, width
  31) of ~700k angles over ~150k unit bond vectors;
* ``gated_epilogue``: ``silu(LN(core)) * sigmoid(LN(gate)) [* weight]`` with d = 64 at 300k, 700k
  and 1.4M rows, without weight and with weight (m = n / 2 rows shared by the two bond directions
  as in the atom convolution, or m = n as in the bond convolution).

The sizes are those of CHGNet 0.3.0 on a batch of 64 MPtrj-like structures (fp32);
``FASTCHGNET_BENCH_KERNEL_SCALE`` (default 1) scales all of them. Implementations (``impl``):
``torch`` (reference, eager), ``compile`` (``torch.compile`` of the reference, default mode,
``dynamic=False``; ``FASTCHGNET_BENCH_KERNEL_COMPILE=0`` leaves it out) and ``triton`` (the fused
op, called directly, whatever ``FASTCHGNET_KERNELS`` says). Passes: ``fwd`` (inputs not requiring
grad) and ``fwdbwd`` (forward, then ``torch.autograd.grad`` of all differentiable inputs against a
fixed random output gradient); ``FASTCHGNET_BENCH_KERNEL_PASSES=fwd,fwdbwd,fwdbwd2`` adds
``fwdbwd2`` (the first gradients with ``create_graph=True``, then the gradient of their dot product
with fixed random vectors: the double backward that a force loss needs; not for ``compile``,
which has no double backward).

Timing: each round runs ``INNER`` calls back to back and synchronises once after the last, so the
per-call time (what pytest-benchmark reports, ``iterations=INNER``) includes the GPU work but only
1/INNER of a synchronisation. The first call (compilation / Triton JIT) is made before and its
time stored in ``extra_info["first_call_s"]``.

Groups: ``<op> <case> <pass>``, the three implementations side by side. ``extra_info``: sizes,
``ratio`` (torch eager median / this median: > 1 is faster than eager), ``cuda_kernels`` (CUDA
kernels one call launches), ``extra_mib`` (peak memory of one call above what was allocated
before it), ``max_abs_diff`` (forward output vs torch eager). A summary table is printed at the
end of the session.

The whole module is skipped without CUDA (it still imports on a CPU-only machine: Triton is
imported only inside the tests).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable

import pytest
import torch

from fastchgnet.bench.common import count_cuda_kernels, step_memory_mib
from fastchgnet.nn import functional as reference

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="kernel benchmarks need CUDA (Triton kernels)")

SCALE = float(os.environ.get("FASTCHGNET_BENCH_KERNEL_SCALE", "1") or 1)
N_BONDS = max(1, int(150_000 * SCALE))
N_ANGLES = max(1, int(700_000 * SCALE))
NUM_RADIAL = 31
ANGLE_FREQS = 15  # num_angular 31 = 2 * 15 + 1
ATOM_CUTOFF, BOND_CUTOFF, ENVELOPE_P = 6.0, 3.0, 8
D = 64
LN_EPS = 1e-5
# gated cases: name -> (rows, weight rows: None, "half" (m = n / 2) or "full" (m = n))
GATED_CASES = {
    "300k": (300_000, None),
    "300k w_half": (300_000, "half"),
    "700k": (700_000, None),
    "700k w_full": (700_000, "full"),
    "1.4M": (1_400_000, None),
    "1.4M w_half": (1_400_000, "half"),
}

_PASSES = tuple(p.strip() for p in
                os.environ.get("FASTCHGNET_BENCH_KERNEL_PASSES", "fwd,fwdbwd").split(",")
                if p.strip())
for _p in _PASSES:
    if _p not in ("fwd", "fwdbwd", "fwdbwd2"):
        raise ValueError(f"FASTCHGNET_BENCH_KERNEL_PASSES: unknown pass {_p!r}")
_WITH_COMPILE = os.environ.get("FASTCHGNET_BENCH_KERNEL_COMPILE", "1").strip() not in ("0", "")
IMPLS = ("torch", "compile", "triton") if _WITH_COMPILE else ("torch", "triton")

INNER = 10  # calls per round (one synchronisation per round)
ROUNDS = 15
WARMUP_ROUNDS = 2
DEVICE = "cuda"


def _count(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k" if n >= 1000 else str(n)


CASES = [("radial_bases", f"{_count(N_BONDS)} bonds"), ("angle_basis", f"{_count(N_ANGLES)} angles")]
CASES += [("gated_epilogue", name) for name in GATED_CASES]


# ----------------------------------------------------------------------------------------------
# inputs


class OpInputs:
    """One case: the function arguments, which of them are differentiable, output gradients."""

    def __init__(self, args: tuple, diff: tuple[int, ...], sizes: dict[str, Any]) -> None:
        self.args = args  # the call's positional arguments (tensors do not require grad)
        self.diff = diff  # positions of the differentiable tensor arguments
        self.sizes = sizes
        self.grad_out: list[torch.Tensor] | None = None  # set after the first forward
        self.grad_vec: list[torch.Tensor] | None = None  # for fwdbwd2
        self.reference_out: list[torch.Tensor] | None = None  # torch eager forward

    def with_grad(self) -> tuple[tuple, list[torch.Tensor]]:
        """(arguments with fresh leaves requiring grad at ``diff``, those leaves)."""
        args = list(self.args)
        leaves = []
        for i in self.diff:
            args[i] = args[i].detach().clone().requires_grad_(True)
            leaves.append(args[i])
        return tuple(args), leaves


def _make_inputs(op: str, case: str) -> OpInputs:
    gen = torch.Generator(device=DEVICE).manual_seed(1234)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, device=DEVICE)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=DEVICE)

    if op == "radial_bases":
        # bond lengths with density ~ r^2 on [1, 6] Å (neighbours in a shell grow as r^2);
        # about 1/8 of them below the 3 Å cutoff, as in real graphs
        r = (1.0 + (ATOM_CUTOFF ** 3 - 1.0) * rand(N_BONDS)) ** (1.0 / 3.0)
        freq = math.pi * torch.arange(1, NUM_RADIAL + 1, dtype=torch.float32, device=DEVICE)
        args = (r, freq.clone(), freq.clone(), ATOM_CUTOFF, BOND_CUTOFF, ENVELOPE_P)
        return OpInputs(args, (0, 1, 2), {"bonds": N_BONDS, "K": NUM_RADIAL})
    if op == "angle_basis":
        vec = randn(N_BONDS, 3)
        unit = vec / torch.linalg.vector_norm(vec, dim=1, keepdim=True)
        # legs as in real graphs: angles grouped by centre atom (sorted first leg), the second
        # leg a nearby bond of the same atom, never the first leg itself
        b1 = torch.sort(torch.randint(0, N_BONDS, (N_ANGLES,), generator=gen,
                                      device=DEVICE)).values
        off = torch.randint(1, 25, (N_ANGLES,), generator=gen, device=DEVICE)
        off = torch.where(rand(N_ANGLES) < 0.5, -off, off)
        b2 = b1 + off
        b2 = torch.where((b2 < 0) | (b2 >= N_BONDS), b1 - off, b2).clamp_(0, N_BONDS - 1)
        sign = torch.where(rand(N_ANGLES) < 0.5, -1.0, 1.0)
        freq = torch.arange(1, ANGLE_FREQS + 1, dtype=torch.float32, device=DEVICE)
        args = (unit, b1, b2, sign, freq)
        return OpInputs(args, (0, 4), {"bonds": N_BONDS, "angles": N_ANGLES, "K": ANGLE_FREQS})
    rows, kind = GATED_CASES[case]
    n = max(2, int(rows * SCALE)) // 2 * 2
    core, gate = randn(n, D), randn(n, D)
    w_core, b_core = 1.0 + 0.1 * randn(D), 0.1 * randn(D)
    w_gate, b_gate = 1.0 + 0.1 * randn(D), 0.1 * randn(D)
    if kind is None:
        args = (core, gate, w_core, b_core, w_gate, b_gate, LN_EPS, None)
        return OpInputs(args, (0, 1, 2, 3, 4, 5), {"rows": n, "d": D, "weight_rows": 0})
    m = n // 2 if kind == "half" else n
    weight = 0.5 * randn(m, D)
    args = (core, gate, w_core, b_core, w_gate, b_gate, LN_EPS, weight)
    return OpInputs(args, (0, 1, 2, 3, 4, 5, 7), {"rows": n, "d": D, "weight_rows": m})


def _outputs(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


# ----------------------------------------------------------------------------------------------
# implementations


def _triton_fn(op: str) -> Callable:
    if op == "radial_bases":
        from fastchgnet.kernels.radial import radial_bases as fn
    elif op == "angle_basis":
        from fastchgnet.kernels.angle import angle_basis as fn
    else:
        from fastchgnet.kernels.gated import gated_epilogue as fn
    return fn


_COMPILED: dict[str, Callable] = {}


def _impl_fn(op: str, impl: str) -> Callable:
    ref = getattr(reference, op)
    if impl == "torch":
        return ref
    if impl == "triton":
        return _triton_fn(op)
    if op not in _COMPILED:
        _COMPILED[op] = torch.compile(ref, dynamic=False)
    return _COMPILED[op]


def _call(fn: Callable, inputs: OpInputs, pass_: str) -> Callable[[], Any]:
    """The function to time: one forward (``fwd``) or forward + backward (``fwdbwd``, ``fwdbwd2``)."""
    if pass_ == "fwd":
        args = inputs.args

        def run() -> Any:
            with torch.no_grad():
                return fn(*args)

        return run
    args, leaves = inputs.with_grad()
    grad_out = inputs.grad_out
    if pass_ == "fwdbwd":
        def run() -> Any:
            outs = _outputs(fn(*args))
            return torch.autograd.grad(outs, leaves, grad_out)

        return run
    vec = inputs.grad_vec

    def run2() -> Any:
        outs = _outputs(fn(*args))
        firsts = torch.autograd.grad(outs, leaves, grad_out, create_graph=True)
        total = sum((g * v).sum() for g, v in zip(firsts, vec))
        return torch.autograd.grad(total, leaves)

    return run2


def _synced_every(fn: Callable[[], Any], inner: int) -> Callable[[], None]:
    """``fn`` that synchronises the device after every ``inner``-th call."""
    count = [0]

    def run() -> None:
        fn()
        count[0] += 1
        if count[0] % inner == 0:
            torch.cuda.synchronize()

    return run


# ----------------------------------------------------------------------------------------------
# ratios vs torch eager and the summary


class KernelBook:
    """Medians per (group, impl); ``ratio`` = torch eager median / this median, filled into the
    ``extra_info`` of every implementation of a group once torch eager has run."""

    def __init__(self) -> None:
        self.groups: dict[str, dict[str, tuple[float, dict]]] = {}

    def record(self, benchmark: Any, impl: str) -> None:
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable
            return
        median = float(stats.stats.median)
        info = benchmark.extra_info
        info["impl"] = impl
        info["median_us"] = median * 1e6
        book = self.groups.setdefault(benchmark.group, {})
        book[impl] = (median, info)
        if "torch" in book:
            base = book["torch"][0]
            for med, extra in book.values():
                extra["ratio"] = base / med if med > 0 else None
                extra["ratio_baseline"] = "torch eager"

    def summary(self) -> list[str]:
        impls = [i for i in IMPLS]
        head = f"{'group':<40s}" + "".join(f"{i + ' us':>12s}" for i in impls)
        head += "".join(f"{'eager/' + i:>15s}" for i in impls if i != "torch")
        lines = [head]
        for group, book in self.groups.items():
            line = f"{group:<40s}"
            for i in impls:
                line += f"{book[i][0] * 1e6:12.1f}" if i in book else f"{'n/a':>12s}"
            for i in impls:
                if i == "torch":
                    continue
                if i in book and "torch" in book:
                    line += f"{book['torch'][0] / book[i][0]:14.2f}x"
                else:
                    line += f"{'n/a':>15s}"
            lines.append(line)
        return lines if len(lines) > 1 else []


class _SummaryPlugin:
    def __init__(self, book: KernelBook) -> None:
        self.book = book

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        lines = self.book.summary()
        if lines:
            terminalreporter.section("fastchgnet kernels vs torch eager (median per call, "
                                     "ratio = eager/impl)")
            for line in lines:
                terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def kernel_book(request) -> KernelBook:
    book = KernelBook()
    name = "fastchgnet-kernel-bench-summary"
    manager = request.config.pluginmanager
    if manager.get_plugin(name) is None:
        manager.register(_SummaryPlugin(book), name)
    return book


@pytest.fixture(scope="module", autouse=True)
def _dynamo_limits():
    """Each (op, shape, grad mode) is one compiled graph of the same function: allow them all
    (the default recompile limit of 8 per function would silently fall back to eager)."""
    cfg = torch._dynamo.config
    names = [n for n in ("recompile_limit", "cache_size_limit") if hasattr(cfg, n)]
    old = {n: getattr(cfg, n) for n in names}
    for n in names:
        setattr(cfg, n, max(64, old[n]))
    yield
    for n, v in old.items():
        setattr(cfg, n, v)


@pytest.fixture(scope="module")
def op_inputs():
    """``get(op, case)`` -> :class:`OpInputs` (cached; output gradients from a torch forward)."""
    cache: dict = {}

    def get(op: str, case: str) -> OpInputs:
        key = (op, case)
        if key not in cache:
            for other in list(cache):  # keep one case resident (the 1.4M-row cases are large)
                del cache[other]
            torch.cuda.empty_cache()
            inputs = _make_inputs(op, case)
            gen = torch.Generator(device=DEVICE).manual_seed(99)
            with torch.no_grad():
                outs = _outputs(getattr(reference, op)(*inputs.args))
                inputs.reference_out = outs
                inputs.grad_out = [torch.randn(o.shape, generator=gen, device=DEVICE)
                                   for o in outs]
                inputs.grad_vec = [torch.randn(inputs.args[i].shape, generator=gen,
                                               device=DEVICE) for i in inputs.diff]
            cache[key] = inputs
        return cache[key]

    return get


# ----------------------------------------------------------------------------------------------
# the benchmark


# impl varies fastest (torch eager first: the ratios need it), then the pass, then the case
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", _PASSES)
@pytest.mark.parametrize("op,case", CASES, ids=[f"{o}-{c.replace(' ', '_')}" for o, c in CASES])
def test_kernel(benchmark, kernel_book, op_inputs, op: str, case: str, pass_: str,
                impl: str) -> None:
    if impl == "compile" and pass_ == "fwdbwd2":
        pytest.skip("torch.compile has no double backward")
    inputs = op_inputs(op, case)
    fn = _impl_fn(op, impl)
    call = _call(fn, inputs, pass_)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    call()  # compilation / Triton JIT / autotuning
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    with torch.no_grad():
        out = _outputs(fn(*inputs.args))
    diff = max(float((o - r).abs().max()) if o.numel() else 0.0
               for o, r in zip(out, inputs.reference_out))
    del out

    benchmark.group = f"{op} {case} {pass_}"
    benchmark.extra_info.update(
        op=op, case=case, pass_=pass_, impl=impl, **inputs.sizes, dtype="float32",
        device=torch.cuda.get_device_name(), inner_calls=INNER, first_call_s=first_s,
        max_abs_diff=diff, torch=torch.__version__,
    )
    benchmark.pedantic(_synced_every(call, INNER), rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS,
                       iterations=INNER)
    torch.cuda.synchronize()
    benchmark.extra_info["cuda_kernels"] = count_cuda_kernels(call, DEVICE)
    benchmark.extra_info["extra_mib"] = step_memory_mib(call, DEVICE)[1]
    kernel_book.record(benchmark, impl)
