"""Prediction API: structures in, numpy arrays out (chgnet's keys and units)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fastchgnet.data.batch import collate, split_by_size
from fastchgnet.data.graph import CrystalGraph, build_graphs
from fastchgnet.device import flush_denormals
from fastchgnet.keys import PER_ATOM, PER_GRAPH, check_task

# Default bounds on one batch so that a few huge structures do not exhaust memory. Counted in
# atoms, directed bonds and angles (the sizes that drive memory), as well as structures.
DEFAULT_MAX_ATOMS = 20_000
DEFAULT_MAX_BONDS = 1_500_000
DEFAULT_MAX_ANGLES = 3_000_000


# (test, convert) pairs: a model object for which ``test(obj)`` holds is replaced by
# ``convert(obj)`` before predicting. ``fastchgnet.model`` registers the chgnet one
# (``weights.is_chgnet_model``, ``weights.from_chgnet_model``); this module cannot import
# ``weights`` itself (weights -> exact -> predict would be an import cycle). The package's
# ``__init__`` runs before this module, so the chgnet adapter is always registered.
_MODEL_ADAPTERS: list[tuple[Callable[[Any], bool], Callable[[Any], torch.nn.Module]]] = []


def register_model_adapter(test: Callable[[Any], bool],
                           convert: Callable[[Any], torch.nn.Module]) -> None:
    """Let :func:`predict` take foreign model objects: those for which ``test(obj)`` is true are
    converted with ``convert(obj)`` (a fastchgnet model) first."""
    if (test, convert) not in _MODEL_ADAPTERS:
        _MODEL_ADAPTERS.append((test, convert))


def as_fastchgnet_model(model: Any) -> torch.nn.Module:
    """``model`` itself when it is a fastchgnet model; a registered adapter's conversion of a
    foreign one (e.g. a ``chgnet.model.CHGNet``: converted on every call, so convert once with
    ``fastchgnet.model.weights.from_chgnet_model`` for repeated predictions), placed on the
    foreign model's device."""
    if callable(getattr(model, "graph_kwargs", None)):
        return model
    for test, convert in _MODEL_ADAPTERS:
        if test(model):
            params = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
            net = convert(model)
            return net.to(params.device) if params is not None else net
    raise TypeError(f"model must be a fastchgnet model, got {type(model).__module__}."
                    f"{type(model).__name__}")


def _is_single(structures: Any) -> bool:
    return not isinstance(structures, (list, tuple)) or (
        hasattr(structures, "get_positions")  # an ASE Atoms is not a list
    )


def predict(
    model: torch.nn.Module,
    structures: Any,
    *,
    task: str = "efsm",
    batch_size: int = 16,
    return_site_energies: bool = False,
    return_crystal_feas: bool = False,
    return_atom_feas: bool = False,
    max_atoms: int | None = DEFAULT_MAX_ATOMS,
    max_bonds: int | None = DEFAULT_MAX_BONDS,
    max_angles: int | None = DEFAULT_MAX_ANGLES,
    on_isolated_atoms: str = "error",
    ids: Sequence[Any] | None = None,
) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
    """Predict energy, forces, stress and magnetic moments.

    Args:
        model: a fastchgnet model (e.g. from :func:`fastchgnet.load_model`), or a
            ``chgnet.model.CHGNet`` object (its weights are converted to an exact fastchgnet model
            on each call: for many calls convert once with
            ``fastchgnet.model.weights.from_chgnet_model``).
        structures: a pymatgen ``Structure``, an ASE ``Atoms``, a :class:`CrystalGraph`, or a list
            of them.
        task: which outputs: ``"e"``, ``"ef"``, ``"em"``, ``"efs"``, ``"efsm"``...
        batch_size: at most this many structures per batch.
        max_atoms, max_bonds, max_angles: further bounds on one batch (bonds counted directed);
            ``None`` for no bound. A single structure above a bound runs alone.
        on_isolated_atoms: ``"error"``, ``"warn"`` or ``"ignore"`` (atoms without a neighbour
            within the atom-graph cutoff).
        ids: optional ids, used in error messages.

    Returns:
        For one structure a dict, for a list a list of dicts (same order), of numpy arrays:
        ``e`` () eV/atom, ``f`` (n, 3) eV/Å, ``s`` (3, 3) GPa (positive = tensile), ``m`` (n,) μB;
        on request ``site_energies`` (n,) eV, ``crystal_fea`` (d,), ``atom_fea`` (n, d).

    Raises:
        ValueError naming every bad structure (index and id) and its problem; nothing is predicted
        then, so no result is silently missing.
    """
    check_task(task)
    model = as_fastchgnet_model(model)
    single = _is_single(structures)
    items = [structures] if single else list(structures)
    if not items:
        return []
    gkw = model.graph_kwargs()
    to_build = [i for i, s in enumerate(items) if not isinstance(s, CrystalGraph)]
    built = build_graphs([items[i] for i in to_build],
                         ids=[ids[i] if ids is not None else i for i in to_build],
                         on_isolated_atoms=on_isolated_atoms, **gkw) if to_build else []
    graphs: list[CrystalGraph] = list(items)  # type: ignore[arg-type]
    for i, g in zip(to_build, built):
        graphs[i] = g

    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    was_training = model.training
    model.eval()
    results: list[dict[str, np.ndarray]] = []
    try:
        for group in split_by_size(graphs, max_graphs=batch_size, max_atoms=max_atoms,
                                   max_bonds=max_bonds, max_angles=max_angles):
            batch = collate([graphs[i] for i in group], dtype=dtype).to(device)
            no_grad = task in ("e", "em") or not getattr(model, "forces_by_autograd", True)
            with torch.no_grad() if no_grad else nullcontext(), flush_denormals(device):
                out = model(batch, task=task, create_graph=False,
                            return_site_energies=return_site_energies,
                            return_crystal_feas=return_crystal_feas,
                            return_atom_feas=return_atom_feas)
            results.extend(_unbatch(out, batch.n_atoms.tolist()))
    finally:
        model.train(was_training)
    return results[0] if single else results


def _unbatch(out: dict[str, torch.Tensor], n_atoms: list[int]) -> list[dict[str, np.ndarray]]:
    arrays = {k: v.detach().cpu().numpy() for k, v in out.items() if k in PER_GRAPH + PER_ATOM}
    splits = np.cumsum(n_atoms)[:-1]
    res: list[dict[str, np.ndarray]] = [{} for _ in n_atoms]
    for k, a in arrays.items():
        parts = np.split(a, splits) if k in PER_ATOM else list(a)
        for r, part in zip(res, parts):
            r[k] = np.asarray(part)
    return res

