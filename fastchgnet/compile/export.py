"""Deployment: the inference forward as a ``torch.export`` program, packaged by AOTInductor.

:func:`export_model`, :func:`save_exported`, :func:`load_exported` — the inference forward as a
``torch.export`` program (dynamic numbers of atoms, bonds, angles and structures), compiled by
AOTInductor into one ``.pt2`` file that runs with torch alone, without fastchgnet's code. For the
exact model the force gradient is first traced into plain aten ops with ``make_fx``
(``torch.export`` cannot trace ``autograd.grad`` itself), the route of the NequIP framework.
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.export import Dim
from torch.fx.experimental.proxy_tensor import make_fx

from fastchgnet.compile.forward import BATCH_FIELDS, batch_args, inference_outputs
from fastchgnet.data.batch import Batch
from fastchgnet.kernels import override

__all__ = ["ExportedModel", "FlatModel", "export_model", "is_aoti_package", "load_exported",
           "save_exported"]


def _torch_kernels() -> contextlib.AbstractContextManager[None]:
    """Trace the plain-torch reference of the fused ops (aten only, no custom ops in a graph that
    must run without fastchgnet)."""
    return override("torch")


class FlatModel(nn.Module):
    """The inference forward on flat tensors (the fields of a Batch, in BATCH_FIELDS order),
    returning a tuple of the outputs of ``task`` in its order — the exportable signature."""

    def __init__(self, model: nn.Module, task: str = "efsm") -> None:
        super().__init__()
        self.model = model.eval()
        self.task = task

    def forward(self, atomic_numbers: Tensor, positions: Tensor, lattice: Tensor,
                atom_graph: Tensor, n_atoms: Tensor, bond_src: Tensor, bond_dst: Tensor,
                bond_image: Tensor, bond_graph: Tensor, angle_center: Tensor, angle_bond1: Tensor,
                angle_bond2: Tensor, angle_sign: Tensor) -> tuple[Tensor, ...]:
        batch = Batch(atomic_numbers, positions, lattice, atom_graph, n_atoms, bond_src, bond_dst,
                      bond_image, bond_graph, angle_center, angle_bond1, angle_bond2, angle_sign,
                      num_graphs=lattice.shape[0])
        out = inference_outputs(self.model, batch, self.task)
        return tuple(out[k] for k in self.task)


def _dynamic_shapes() -> dict[str, dict[int, Any]]:
    # a batch may have one atom, and no bond (isolated atoms, "ignore") or no angle at all
    atoms, graphs = Dim("atoms", min=1), Dim("graphs", min=1)
    bonds, angles = Dim("bonds", min=0), Dim("angles", min=0)
    per = {"atomic_numbers": atoms, "positions": atoms, "atom_graph": atoms, "lattice": graphs,
           "n_atoms": graphs, "bond_src": bonds, "bond_dst": bonds, "bond_image": bonds,
           "bond_graph": bonds, "angle_center": angles, "angle_bond1": angles,
           "angle_bond2": angles, "angle_sign": angles}
    return {k: {0: v} for k, v in per.items()}


def export_model(model: nn.Module, example: Batch, task: str = "efsm") -> torch.export.ExportedProgram:
    """The inference forward as an ``ExportedProgram`` with dynamic atoms, bonds, angles and
    structures (outputs in ``task`` order). The example needs at least 2 atoms, bonds and
    angles (sizes 0 and 1 would be specialised); the program then accepts any size from 0
    (bonds, angles) or 1 (atoms, structures).

    Models whose forces are an energy gradient are first traced with ``make_fx`` (symbolic
    shapes), which writes the backward pass out as aten ops, and the traced module is exported.
    The plain-torch path of the fused kernels is traced, so the program holds aten ops only.
    """
    flat = FlatModel(model, task)
    args = batch_args(example)
    shapes = _dynamic_shapes()
    with _torch_kernels(), torch.no_grad() if not _needs_grad(model, task) else contextlib.nullcontext():
        if _needs_grad(model, task):
            gm = make_fx(flat, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*args)
            return torch.export.export(gm, args, dynamic_shapes=tuple(shapes[n] for n in BATCH_FIELDS),
                                       strict=False)
        return torch.export.export(flat, args, dynamic_shapes=shapes, strict=False)


def _needs_grad(model: nn.Module, task: str) -> bool:
    return getattr(model, "forces_by_autograd", True) and ("f" in task or "s" in task)


def save_exported(model: nn.Module, path: str | os.PathLike, example: Batch, task: str = "efsm",
                  *, aoti: bool = True, inductor_configs: dict[str, Any] | None = None) -> Path:
    """Export the inference forward to one file.

    ``aoti=True``: an AOTInductor package (``.pt2``, compiled C++/CUDA; load it with
    :func:`load_exported` or ``torch._inductor.aoti_load_package``). ``aoti=False``: the
    ``ExportedProgram`` itself (``torch.export.save``; runs through the torch interpreter). Either
    runs without fastchgnet. The file records the task, dtype, cutoffs and input order as metadata.
    """
    path = Path(path)
    ep = export_model(model, example, task)
    meta = {"fastchgnet_task": task, "fastchgnet_inputs": json.dumps(BATCH_FIELDS),
            "fastchgnet_dtype": str(example.positions.dtype),
            "fastchgnet_graph": json.dumps(model.graph_kwargs())}  # type: ignore[operator]
    if not aoti:
        torch.export.save(ep, str(path), extra_files={"fastchgnet.json": json.dumps(meta)})
        return path
    configs = {"aot_inductor.metadata": meta, **(inductor_configs or {})}
    with _torch_kernels():
        out = torch._inductor.aoti_compile_and_package(ep, package_path=str(path),
                                                       inductor_configs=configs)
    return Path(out)


class ExportedModel:
    """A loaded export: ``exported(batch) -> dict`` of the task's outputs (``e``, ``f``...)."""

    def __init__(self, fn: Callable[..., Any], meta: dict[str, str]) -> None:
        self.fn, self.meta = fn, meta
        self.task: str = meta["fastchgnet_task"]
        self.graph_kwargs: dict[str, float] = json.loads(meta["fastchgnet_graph"])

    def __call__(self, batch: Batch, task: str | None = None) -> dict[str, Tensor]:
        if task is not None and any(k not in self.task for k in task):
            raise ValueError(f"this export computes {self.task!r}; {task!r} was asked for")
        outs = self.fn(*batch_args(batch))
        return dict(zip(self.task, outs))


def is_aoti_package(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an AOTInductor package (else an ExportedProgram file)."""
    with zipfile.ZipFile(path) as z:
        return any("/data/aotinductor/" in n for n in z.namelist())


def load_exported(path: str | os.PathLike) -> ExportedModel:
    """Load a file written by :func:`save_exported` (either kind)."""
    path = str(path)
    if is_aoti_package(path):
        runner = torch._inductor.aoti_load_package(path)
        meta = {k: v for k, v in runner.get_metadata().items() if k.startswith("fastchgnet_")}
        return ExportedModel(runner, meta)
    extra = {"fastchgnet.json": ""}
    ep = torch.export.load(path, extra_files=extra)
    return ExportedModel(ep.module(), json.loads(extra["fastchgnet.json"]))
