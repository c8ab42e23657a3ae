"""The model's one linear map, ``x @ weight.T + bias``, with a faster CPU matrix product.

On the CPU torch's ``addmm`` calls MKL, which on AMD processors runs its AVX2 code path: on the
2-core AMD EPYC Zen 5 VM (full-width AVX-512) a float32 ``(23552, 64) @ (64, 64)`` product took
1.9 ms with MKL and 0.92 ms with oneDNN (which torch also ships, as
``torch.ops.mkldnn._linear_pointwise``), with identical results on the shapes measured. On a Zen 4
VM (AVX-512 on 256-bit units) oneDNN was only 5-10 % faster from 2k rows and slower below 1k,
and the whole MD and training steps were as fast or faster with MKL alone (eager 64-atom MD step
34.5 against 39.6 ms, 512 atoms 243.5 against 245.6 ms, training step at batch 8 664 against 682
ms); on Intel processors MKL uses AVX-512 itself. So oneDNN is used only where it pays,
:func:`onednn_preferred`: AMD processors of family 26 (Zen 5) or later, unless
``FASTCHGNET_CPU_GEMM`` says otherwise. There :func:`linear` sends the large products of a
float32 CPU call to oneDNN and everything else to ``addmm``:

* oneDNN only where it is available, for float32 (it has no float64 kernel), and in eager
  calls for at least :data:`MIN_ROWS` rows (below that its per-call set-up costs more than it
  saves). While ``torch.compile`` traces, every float32 CPU product goes to the op
  ``fastchgnet::onednn_linear`` (a size test would add a guard), which Inductor lowers to
  ``fastchgnet::cpu_linear``: oneDNN from :data:`MIN_ROWS` rows, MKL below, chosen at each
  call (:mod:`fastchgnet.compile.lowering`). On the Zen 5 VM the 512-atom MD step took 135 ms
  compiled with oneDNN products against 169 ms with MKL's. A compiled training step traces
  plain products (``torch.func``); Inductor's post-grad pass turns them into
  ``fastchgnet::cpu_mm``, which chooses the same way. ``torch.export`` gets ``F.linear`` (a
  saved program must run without fastchgnet);
* autograd: the input gradient ``g @ weight`` is the same product with the transposed weight,
  computed by the same function, so it is differentiable again (forces that are trained need
  second derivatives); the weight gradient ``g.T @ x`` with oneDNN too, on transposed views;
* a custom autograd function cannot see which gradients the engine will use: inside
  :func:`input_gradients_only` (forces and stress are ``autograd.grad`` with respect to the bond
  vectors alone) it skips the weight and bias gradients, which that call would throw away;
* ``FASTCHGNET_CPU_GEMM`` (read at every call): ``aten`` turns the oneDNN path off, ``onednn``
  turns it on whatever the processor; unset (or ``auto``), :func:`onednn_preferred` decides.

The choice depends only on the device, dtype and row count of the call (a Python int: no host
synchronisation). Results differ from ``addmm``'s by float32 rounding (summation order).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from fastchgnet.device import cpu_info

__all__ = ["MIN_ROWS", "input_gradients_only", "linear", "onednn_preferred", "plain_products", "use_onednn"]

#: fewest rows for which the oneDNN product is used (crossover measured at 200-1000 rows, 64 wide)
MIN_ROWS = 256

_ONEDNN = (torch.backends.mkldnn.is_available()
           and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class _State(threading.local):
    """Per-thread scopes. Every thread's state holds both attributes from the start (local's
    ``__init__`` runs in each thread): torch.compile guards on them, and an attribute that
    appeared only after a first scope would fail that guard and recompile."""

    def __init__(self) -> None:
        self.inputs_only = False
        self.plain = False


_STATE = _State()


@contextmanager
def input_gradients_only() -> Iterator[None]:
    """Scope of an ``autograd.grad`` call whose inputs are no weights of :func:`linear` (e.g. the
    forces' gradient with respect to the bond vectors): the oneDNN backward skips the weight and
    bias gradients there. Backward passes outside the scope (``loss.backward()`` in training, also
    of a graph built inside it) compute them. Per thread; CPU backward runs on the calling thread."""
    with _flag("inputs_only"):
        yield


@contextmanager
def _flag(name: str) -> Iterator[None]:
    """Set the per-thread flag ``name`` for the block, then restore it."""
    previous = getattr(_STATE, name)
    setattr(_STATE, name, True)
    try:
        yield
    finally:
        setattr(_STATE, name, previous)


@contextmanager
def plain_products() -> Iterator[None]:
    """Scope in which :func:`linear` is always ``F.linear``: code under ``torch.func`` transforms
    (the compiled training step of a model with autograd forces takes the forces with
    ``torch.func.grad``), which neither the autograd function nor the ``torch.library`` op
    support. Per thread; Dynamo traces the scope inside a compiled function."""
    with _flag("plain"):
        yield


#: the first processor family of AMD's whose products are faster with oneDNN (Zen 5)
ONEDNN_AMD_FAMILY = 26


def _prefers_onednn(info: dict[str, str]) -> bool:
    """Whether a processor (:func:`fastchgnet.device.cpu_info`) is one of those where oneDNN pays."""
    try:
        family = int(info.get("cpu family", ""))
    except ValueError:
        return False
    return info.get("vendor_id") == "AuthenticAMD" and family >= ONEDNN_AMD_FAMILY


# read once, here (a file read, no state changed): a constant while Dynamo traces
_HOST_PREFERS_ONEDNN = _prefers_onednn(cpu_info())


def onednn_preferred() -> bool:
    """Whether this host's float32 CPU products go to oneDNN (see the module docstring):
    ``FASTCHGNET_CPU_GEMM=aten`` no, ``=onednn`` yes, else AMD processors of family
    :data:`ONEDNN_AMD_FAMILY` or later."""
    choice = os.environ.get("FASTCHGNET_CPU_GEMM", "").strip().lower()
    if choice in ("aten", "onednn"):
        return choice == "onednn"
    return _HOST_PREFERS_ONEDNN


def use_onednn(x: Tensor) -> bool:
    """Whether :func:`linear` sends this input to oneDNN (see the module docstring)."""
    if not (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2):
        return False
    if _STATE.plain:
        return False
    if not onednn_preferred():
        return False
    if _exporting():  # an exported program must run without fastchgnet's op
        return False
    # a compiled graph calls the op whatever the size (a size test would add a guard)
    if torch.compiler.is_compiling():
        return True
    rows = x.shape[0]
    # symbolic sizes outside Dynamo: make_fx tracing for torch.export, which gets plain products
    return not isinstance(rows, torch.SymInt) and rows >= MIN_ROWS


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """``grad.T @ x`` (out, in): by oneDNN on the transposed views of contiguous tensors (no
    copies; 1.3-1.6x faster than ``mm`` for 5k-24k rows), the smaller of the two as its "input";
    by ``mm`` when this backward is itself differentiated (the oneDNN call has no derivative)."""
    if torch.is_grad_enabled() or not (grad.is_contiguous() and x.is_contiguous()):
        return grad.t() @ x  # (oneDNN is very slow on other strides: a slice's transpose)
    if x.shape[1] <= grad.shape[1]:
        return _onednn(x.t(), grad.t(), None).t()
    return _onednn(grad.t(), x.t(), None)


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        params = not _STATE.inputs_only
        if ctx.needs_input_grad[0]:
            # differentiable: the product of a differentiated gradient (training on forces)
            gx = _OneDNNLinear.apply(grad, weight.t().contiguous(), None)
        if params and ctx.needs_input_grad[1]:
            gw = _weight_grad(grad, x)
        if params and ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(0)
        return gx, gw, gb


@torch.library.custom_op("fastchgnet::onednn_linear", mutates_args=())
def onednn_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight.T`` by oneDNN, as one opaque op in compiled graphs (differentiable, also
    twice: its input gradient is this op again)."""
    return _onednn(x, weight, None)


@onednn_linear.register_fake
def _(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


def _op_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    ctx.save_for_backward(*inputs)


def _op_backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def]
    # traced into compiled graphs: the weight gradient stays ``mm`` (Inductor fails to lower the
    # raw oneDNN call with a weight that is not a constant), and gradients nobody reads are
    # removed by the compiler, so no input_gradients_only test is needed here
    x, weight = ctx.saved_tensors
    gx = onednn_linear(grad, weight.t().contiguous()) if ctx.needs_input_grad[0] else None
    gw = grad.t() @ x if ctx.needs_input_grad[1] else None
    return gx, gw


onednn_linear.register_autograd(_op_backward, setup_context=_op_setup)


# The op Inductor's generated code calls for ``onednn_linear`` (fastchgnet.compile.lowering): a
# plain dispatcher op, about 2 us a call above ``mm`` where the custom op's Python layers cost
# 11 us, which picks the library by the row count of each call, with the eager threshold
# (no guard, no recompilation). Only ever called after autograd has been traced, so it has no
# derivative.
_LIB = torch.library.Library("fastchgnet", "FRAGMENT")
_LIB.define("cpu_linear(Tensor x, Tensor weight) -> Tensor")


def _cpu_linear(x: Tensor, weight: Tensor) -> Tensor:
    # rows with unit stride (a column slice of a wider tensor is fine); the small weight is
    # copied when Inductor passes it transposed
    if x.shape[0] >= MIN_ROWS and x.stride(1) == 1 and x.dtype == torch.float32:
        return _onednn(x, weight.contiguous(), None)
    return torch.mm(x, weight.t())


def _cpu_linear_meta(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


_LIB.impl("cpu_linear", _cpu_linear, "CPU")
_LIB.impl("cpu_linear", _cpu_linear_meta, "Meta")

# ``a @ b`` as Inductor's code calls it in place of ``aten.mm`` in the graphs of a compiled training
# step (:mod:`fastchgnet.compile.lowering`; ``torch.func`` traces plain products there): oneDNN for
# a product of many rows (a forward or input-gradient product) and for a reduction over many rows
# (a weight gradient ``grad.T @ x``, on the transposed view), ``mm`` otherwise. Always returns a
# contiguous result, as its Meta function says.
_LIB.define("cpu_mm(Tensor a, Tensor b) -> Tensor")


def _cpu_mm(a: Tensor, b: Tensor) -> Tensor:
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        m, k = a.shape
        if m >= MIN_ROWS and a.stride(1) == 1:  # rows x (small) weight
            return _onednn(a, b.t().contiguous(), None)
        if k >= MIN_ROWS and a.stride(0) == 1 and b.stride(1) == 1 and m < MIN_ROWS:
            # (out, rows) @ (rows, in): a weight gradient, both operands views of row-major
            # tensors; the narrower one as oneDNN's input (as in _weight_grad)
            if b.shape[1] <= m:
                return _onednn(b.t(), a, None).t().contiguous()
            return _onednn(a, b.t(), None)
    return torch.mm(a, b)


def _cpu_mm_meta(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty((a.shape[0], b.shape[1]))


_LIB.impl("cpu_mm", _cpu_mm, "CPU")
_LIB.impl("cpu_mm", _cpu_mm_meta, "Meta")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` for ``x`` (n, in), ``weight`` (out, in), ``bias`` (out,) or None."""
    if use_onednn(x):
        if torch.compiler.is_compiling():
            y = onednn_linear(x, weight)
            return y if bias is None else y + bias
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)
