"""Fast inference forwards: a compiled forward and CUDA-graph replay with padding to size buckets.

* :class:`CompiledForward` — ``torch.compile`` of the whole inference forward (energy, and forces
  and stress by ``torch.autograd.grad`` for the exact/decoupled models, or by the heads), with
  dynamic shapes and no ``create_graph``. Where torch supports tracing ``autograd.grad``
  (``torch._dynamo.config.trace_autograd_ops``, torch 2.13) it is one graph with no break;
  otherwise Dynamo breaks the graph at the gradient and compiles both sides.
* :func:`pad_batch` / :class:`CUDAGraphForward` — an MD step has a fixed number of atoms, but its
  bond and angle counts change from step to step. Padding them up to a bucket size (a geometric
  series) gives a few fixed shapes, and each shape is captured once as a CUDA graph and replayed.
  The padding lives in one extra structure (one H atom in a 10 Å cube, bonds to its own images)
  that is cut off the outputs, so the real structures' outputs are unchanged.

The dtype is the model's: float32 by default, float64 with ``load_model(..., dtype=torch.float64)``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from fastchgnet.compile.settings import compile_callable
from fastchgnet.data.batch import Batch
from fastchgnet.keys import PER_ATOM, PER_GRAPH

__all__ = ["BATCH_FIELDS", "CUDAGraphForward", "CompiledForward", "batch_args", "bucket",
           "inference_outputs", "pad_batch", "unpad"]

# The Batch fields that carry tensors, in the order of the exported program's inputs.
BATCH_FIELDS = ("atomic_numbers", "positions", "lattice", "atom_graph", "n_atoms", "bond_src",
                "bond_dst", "bond_image", "bond_graph", "angle_center", "angle_bond1",
                "angle_bond2", "angle_sign")


def inference_outputs(model: nn.Module, batch: Batch, task: str) -> dict[str, Tensor]:
    """``model(batch, task)`` for inference: no ``create_graph``, outputs detached."""
    out = model(batch, task=task, create_graph=False)
    return {k: v.detach() for k, v in out.items()}


def batch_args(batch: Batch) -> tuple[Tensor, ...]:
    """The tensors of ``batch`` in :data:`BATCH_FIELDS` order."""
    return tuple(getattr(batch, n) for n in BATCH_FIELDS)


@contextlib.contextmanager
def _trace_autograd() -> Iterator[None]:
    """Let Dynamo trace ``torch.autograd.grad`` into the graph, where this torch can."""
    cfg = torch._dynamo.config
    if hasattr(cfg, "trace_autograd_ops"):
        with cfg.patch(trace_autograd_ops=True):
            yield
    else:  # older torch: a graph break at the gradient
        yield


class CompiledForward:
    """``forward(batch, task) -> outputs`` of ``model``, compiled with ``torch.compile``.

    Args:
        model: any fastchgnet model (exact, decoupled, heads); put in eval mode.
        backend, mode, dynamic: passed to ``torch.compile`` (``mode="reduce-overhead"`` adds
            CUDA graphs; combine with fixed shapes, see :class:`CUDAGraphForward`).
        fullgraph: require one graph (default: True where ``autograd.grad`` can be traced, or for
            models without an energy gradient).

    Compilation happens at the first call per task; later batches of any size reuse it.
    """

    def __init__(self, model: nn.Module, *, backend: str | Callable = "inductor",
                 mode: str | None = None, dynamic: bool | None = True,
                 fullgraph: bool | None = None) -> None:
        self.model = model.eval()
        if fullgraph is None:
            fullgraph = (hasattr(torch._dynamo.config, "trace_autograd_ops")
                         or not getattr(model, "forces_by_autograd", True))
        # the scoped settings of compile_callable: no recompilation for batches without angles,
        # floats as constants
        self._fn = compile_callable(self._forward, backend=backend, mode=mode, dynamic=dynamic,
                                    fullgraph=fullgraph)

    def _forward(self, batch: Batch, task: str) -> dict[str, Tensor]:
        return inference_outputs(self.model, batch, task)

    def __call__(self, batch: Batch, task: str = "efs") -> dict[str, Tensor]:
        with _trace_autograd():
            return self._fn(batch, task)


# ------------------------------------------------------------------------------------------------
# padding to size buckets


def bucket(n: int, growth: float = 1.25, minimum: int = 64) -> int:
    """Smallest size ``>= n`` of the series ``s_0 = minimum``, ``s_k+1 = ceil8(s_k * growth)``
    (multiples of 8).

    With ``growth = 1.25`` a padded step does at most ~25 % extra work on bonds and angles, and a
    bond count that drifts by a few percent during MD stays in one or two buckets.
    """
    size = max(8, int(math.ceil(minimum / 8) * 8))
    while size < n:
        size = max(size + 8, int(math.ceil(size * growth / 8) * 8))
    return size


def pad_batch(batch: Batch, n_bonds: int, n_angles: int) -> Batch:
    """``batch`` plus one padding structure so that it has exactly ``n_bonds`` bonds and
    ``n_angles`` angles (``n_bonds >= batch.num_bonds + 2``, ``n_angles >= batch.num_angles``).

    The padding structure is one H atom in a 10 Å cubic cell; its bonds go to its own images
    (10 Å, beyond any cutoff), its angles pair two of them at 90°. It shares nothing with the real
    structures, whose outputs are therefore those of the unpadded batch.
    """
    nb, na = batch.num_bonds, batch.num_angles
    if n_bonds < nb + 2 or n_angles < na:
        raise ValueError(f"cannot pad {nb} bonds / {na} angles to {n_bonds} / {n_angles} "
                         "(the padding needs 2 bonds of its own)")
    dev, dt = batch.positions.device, batch.positions.dtype
    p_atom, p_graph = batch.num_atoms, batch.num_graphs
    pb, pa = n_bonds - nb, n_angles - na

    def full(n: int, v: int) -> Tensor:
        return torch.full((n,), v, dtype=torch.int64, device=dev)

    img = torch.zeros(pb, 3, dtype=dt, device=dev)
    img[0::2, 0] = 1.0
    img[1::2, 1] = 1.0
    return Batch(
        atomic_numbers=torch.cat([batch.atomic_numbers, full(1, 1)]),
        positions=torch.cat([batch.positions, batch.positions.new_zeros(1, 3)]),
        lattice=torch.cat([batch.lattice, 10.0 * torch.eye(3, dtype=dt, device=dev)[None]]),
        atom_graph=torch.cat([batch.atom_graph, full(1, p_graph)]),
        n_atoms=torch.cat([batch.n_atoms, full(1, 1)]),
        bond_src=torch.cat([batch.bond_src, full(pb, p_atom)]),
        bond_dst=torch.cat([batch.bond_dst, full(pb, p_atom)]),
        bond_image=torch.cat([batch.bond_image, img]),
        bond_graph=torch.cat([batch.bond_graph, full(pb, p_graph)]),
        angle_center=torch.cat([batch.angle_center, full(pa, p_atom)]),
        angle_bond1=torch.cat([batch.angle_bond1, full(pa, nb)]),
        angle_bond2=torch.cat([batch.angle_bond2, full(pa, nb + 1)]),
        angle_sign=torch.cat([batch.angle_sign, batch.angle_sign.new_ones(pa)]),
        num_graphs=p_graph + 1,
    )


def unpad(out: dict[str, Tensor], n_atoms: int, n_graphs: int) -> dict[str, Tensor]:
    """The real structures' outputs of a padded batch (per-atom and per-structure keys of
    :mod:`fastchgnet.keys`; other keys are dropped)."""
    res = {}
    for k, v in out.items():
        if k in PER_ATOM:
            res[k] = v[:n_atoms]
        elif k in PER_GRAPH:
            res[k] = v[:n_graphs]
    return res


class CUDAGraphForward:
    """``forward(batch, task) -> outputs`` replayed from CUDA graphs, one per size bucket.

    A batch is padded (:func:`pad_batch`) to bucket sizes of its bonds and angles; the key of a
    graph is (atoms, structures, bond bucket, angle bucket, task). The first batch of a key is
    run a few times on a side stream (warm-up) and captured; later batches of the key copy their
    tensors into the captured input buffers and replay. All graphs share one memory pool.

    Args:
        model: a fastchgnet model on a CUDA device (eval mode).
        forward: what to capture, ``forward(batch, task)``; default the eager inference forward
            (a :class:`CompiledForward` without CUDA graphs also works).
        growth, minimum: the bucket series (see :func:`bucket`).
        capture: capture CUDA graphs (default: when the model is on CUDA). Without, the padded
            batch runs eagerly (the same numbers; for tests on the CPU).
    """

    def __init__(self, model: nn.Module, *, forward: Callable[[Batch, str], dict] | None = None,
                 growth: float = 1.25, minimum: int = 64, capture: bool | None = None,
                 warmup: int = 3) -> None:
        self.model = model.eval()
        self.forward = forward or (lambda b, t: inference_outputs(self.model, b, t))
        self.growth, self.minimum, self.warmup = growth, minimum, warmup
        dev = next(model.parameters()).device
        self.capture = dev.type == "cuda" if capture is None else capture
        self.graphs: dict[tuple, tuple[Any, Batch, dict[str, Tensor]]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None

    def padded(self, batch: Batch) -> Batch:
        return pad_batch(batch, bucket(batch.num_bonds + 2, self.growth, self.minimum),
                         bucket(batch.num_angles, self.growth, self.minimum))

    def __call__(self, batch: Batch, task: str = "efs") -> dict[str, Tensor]:
        pb = self.padded(batch)
        if not self.capture:
            return unpad(self.forward(pb, task), batch.num_atoms, batch.num_graphs)
        key = (pb.num_atoms, pb.num_graphs, pb.num_bonds, pb.num_angles, task)
        if key not in self.graphs:
            self.graphs[key] = self._capture(pb, task)
        graph, static_in, static_out = self.graphs[key]
        for name in BATCH_FIELDS:
            getattr(static_in, name).copy_(getattr(pb, name))
        graph.replay()
        return {k: v.clone() for k, v in
                unpad(static_out, batch.num_atoms, batch.num_graphs).items()}

    def _capture(self, pb: Batch, task: str) -> tuple[Any, Batch, dict[str, Tensor]]:
        static_in = Batch(**{n: getattr(pb, n).clone() for n in BATCH_FIELDS},
                          num_graphs=pb.num_graphs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.forward(static_in, task)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self.forward(static_in, task)
        return graph, static_in, static_out
