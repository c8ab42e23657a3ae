"""How Inductor compiles our CPU matrix product (``fastchgnet::onednn_linear``, see
:mod:`fastchgnet.nn.linear`).

Without a lowering of its own, Inductor calls the ``torch.library`` op as it is: every call goes
through the op's Python layers (about 11 µs a call on the 2-core AMD EPYC Zen 4 VM; a 64-atom MD
step makes about 100) and always to oneDNN, whose per-call set-up costs more than MKL's for small
products. :func:`register_gemm_lowering` lowers it to ``fastchgnet::cpu_linear``, a plain
dispatcher op (about 2 µs above ``mm``) that chooses by the row count of each call: oneDNN from
:data:`~fastchgnet.nn.linear.MIN_ROWS` rows (the eager threshold, measured on the Zen 5 VM), MKL's
``mm`` below. The choice is made at run time, so it adds no guard (no recompilation when sizes
change) and a cached compiled graph serves every size. The op is only in graphs traced where
oneDNN is preferred (:func:`~fastchgnet.nn.linear.onednn_preferred`: AMD Zen 5 and later, or
``FASTCHGNET_CPU_GEMM=onednn``). Measured on the Zen 4 VM with oneDNN forced: compiled MD steps
of Si, 1 thread, the variants interleaved in one process (the threshold is read at each call),
medians of 30 (64 atoms) and 10 (512 atoms) rounds of 5 steps:

=========  ==================  ================  ================  ================  ===========
cell       custom op (before)  >= 4096 rows to   >= 1024 rows to   every row to      every
           (all oneDNN)        oneDNN            oneDNN            oneDNN            product MKL
=========  ==================  ================  ================  ================  ===========
64 atoms   33.3 ms             30.1 ms           31.4 ms           31.9 ms           30.3 ms
512 atoms  214 ms              206 ms            214 ms            215 ms            213 ms
=========  ==================  ================  ================  ================  ===========

On that CPU oneDNN gains nothing (so it is not used there by default); on the Zen 5 VM of earlier
sessions it made the compiled 512-atom step 1.25x faster (135 vs 169 ms) and the 64-atom step
1.06x (19.3 vs 20.4 ms), hence the low threshold. The lowering is registered for our op only,
once, when :func:`~fastchgnet.compile.compile_callable` first runs; where this torch's
Inductor lacks a piece it needs, nothing is registered and the op is called as before.
Inductor's on-disk cache does not key on lowerings: a graph it compiled before this lowering
existed keeps calling the op as before (the same values) until that cache is cleared.

A compiled *training* step of a model with autograd forces traces no ``onednn_linear``: it takes
the forces with ``torch.func.grad``, under which the model's products are plain ``F.linear``, so
its forward and backward graphs hold ``aten.mm``/``aten.addmm`` (about 300 in the exact model's
step), which Inductor calls as MKL's product. :func:`gemm_pass` is an Inductor post-grad pass
(``post_grad_custom_post_pass``, set by :func:`~fastchgnet.compile.compile_callable` where
oneDNN is preferred) that rewrites each float32 CPU one into ``fastchgnet::cpu_mm`` (the bias
as an addition Inductor fuses), which takes oneDNN from :data:`~fastchgnet.nn.linear.MIN_ROWS`
rows, also for weight gradients (a reduction over the rows), and ``mm`` otherwise. The pass has
a ``uuid``, so Inductor's cache keys on it. Measured on the Zen 5 VM, 1 thread: the exact
model's training step at batch 8 (112 atoms) took 324 ms with it against 508 ms without
(chgnet's: 1,814 and 1,879 ms in the same runs).
"""

from __future__ import annotations

import logging

import torch

__all__ = ["gemm_pass", "register_gemm_lowering", "rewrite_products"]

log = logging.getLogger("fastchgnet")

_registered: bool | None = None  # None: not tried yet


def register_gemm_lowering() -> bool:
    """Register the Inductor lowering of ``fastchgnet::onednn_linear`` (see the module
    docstring); returns whether it is registered. Idempotent."""
    global _registered
    if _registered is not None:
        return _registered
    _registered = False
    ops = getattr(torch.ops, "fastchgnet", None)
    if ops is None or not hasattr(ops, "onednn_linear") or not hasattr(ops, "cpu_linear"):
        return False
    try:
        from torch._inductor.lowering import fallback_handler, lowerings, register_lowering
    except Exception as exc:  # an Inductor without these pieces: the op is called as it is
        log.debug("no Inductor lowering for fastchgnet::onednn_linear: %s", exc)
        return False
    target = ops.onednn_linear.default
    if getattr(lowerings.get(target), "_fastchgnet", False):  # an earlier import of this module
        _registered = True
        return True
    # else: none yet, or the plain call Inductor registers for a custom op it met first (replaced)
    try:
        call = fallback_handler(ops.cpu_linear.default, add_to_fallback_set=False)

        def _onednn_linear(x, weight):  # type: ignore[no-untyped-def]
            return call(x, weight)

        _onednn_linear._fastchgnet = True  # type: ignore[attr-defined]  (copied by functools.wraps)
        register_lowering(target, type_promotion_kind=None)(_onednn_linear)
    except Exception as exc:  # another Inductor's signatures: the op is called as it is
        log.debug("no Inductor lowering for fastchgnet::onednn_linear: %s", exc)
        return False
    _registered = True
    return True


# --- the products of compiled training steps ---------------------------------------------------

#: part of the pass's cache key: change it when :func:`rewrite_products` or ``cpu_mm`` change
_PASS_VERSION = "1"
_pass: object | None = None


def rewrite_products(graph: torch.fx.Graph) -> int:
    """Replace every float32 CPU ``aten.mm`` / ``aten.addmm`` of an Inductor post-grad graph by
    ``fastchgnet::cpu_mm`` (plus the bias addition); returns how many were replaced.

    A compiled training step of a model with autograd forces traces its products as plain
    ``F.linear`` (``torch.func`` takes no custom op), so after AOTAutograd the forward, the force
    gradient and the parameter gradients are all ``aten.mm``, which Inductor calls as MKL's
    product: about half as fast as oneDNN's on AMD Zen 5 (see :mod:`fastchgnet.nn.linear`).
    ``cpu_mm`` chooses oneDNN or ``mm`` at each call by its operands' sizes and strides."""
    aten = torch.ops.aten
    target = torch.ops.fastchgnet.cpu_mm.default
    n = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dtype != torch.float32 \
                or val.device.type != "cpu":
            continue
        if node.target is aten.addmm.default:
            if len(node.args) != 3 or node.kwargs:  # beta / alpha other than 1
                continue
            bias, a, b = node.args
        else:
            bias, (a, b) = None, node.args
        with graph.inserting_before(node):
            new = graph.call_function(target, (a, b))
            new.meta.update(node.meta)
            if bias is not None:
                out = graph.call_function(aten.add.Tensor, (new, bias))
                out.meta.update(node.meta)
                new = out
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        n += 1
    return n


def gemm_pass() -> object | None:
    """The Inductor post-grad pass that applies :func:`rewrite_products` (for the config key
    ``post_grad_custom_post_pass``), or None where this torch lacks the interface."""
    global _pass
    if _pass is not None:
        return _pass
    if not hasattr(getattr(torch.ops, "fastchgnet", None), "cpu_mm"):
        return None
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except Exception as exc:  # an Inductor without custom passes: products stay as they are
        log.debug("no post-grad pass for the products: %s", exc)
        return None

    class _Products(CustomGraphPass):  # type: ignore[misc, valid-type]
        def __call__(self, graph: torch.fx.Graph) -> None:
            rewrite_products(graph)

        def uuid(self) -> str:
            return f"fastchgnet.cpu_mm.v{_PASS_VERSION}"

    _pass = _Products()
    return _pass
