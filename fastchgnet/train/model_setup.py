"""The model of a training run: built from the config or loaded (``init``), its AtomRef fitted on
the training set (from scratch: to the labels; fine-tuning: refit to the initial model's
residuals), parameter groups frozen."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fastchgnet.data.cache import GraphCache
from fastchgnet.model.config import CHGNetConfig
from fastchgnet.model.exact import CHGNet
from fastchgnet.model.weights import MODEL_TYPES, load_model
from fastchgnet.train.config import TrainConfig
from fastchgnet.train.data import Collator, DevicePrefetcher, EpochBatchSampler, GraphDataset

__all__ = ["baseline_mae", "build_model", "fit_atom_ref", "freeze", "model_energies", "parameter_groups",
           "refit_atom_ref"]


def build_model(cfg: TrainConfig) -> CHGNet:
    """A fresh ``cfg.model`` with the ``cfg.model_config`` overrides, or the weights of ``cfg.init``
    (converted to ``cfg.model`` when the checkpoint is of another type: the parameters it lacks,
    e.g. new heads, keep their initialisation)."""
    if cfg.init is None:
        return MODEL_TYPES[cfg.model](CHGNetConfig(**cfg.model_config))
    model = load_model(cfg.init)
    if model.model_type == cfg.model:
        return model
    converted = MODEL_TYPES[cfg.model](model.config)
    res = converted.load_state_dict(model.state_dict(), strict=False)
    if res.unexpected_keys:
        raise ValueError(f"--init {cfg.init}: its weights do not fit a {cfg.model!r} model "
                         f"(unexpected {res.unexpected_keys[:5]})")
    converted.version = model.version
    return converted


# ------------------------------------------------------------------------------------------------
# AtomRef


def fit_atom_ref(cache: GraphCache, indices: Sequence[int], max_z: int = 94,
                 previous: Tensor | None = None) -> tuple[np.ndarray, float]:
    """Per-element reference energies by least squares on the samples ``indices``.

    Fits ``e_per_atom ≈ sum_Z fraction_Z * ref_Z`` (the reference's AtomRef). Elements absent
    from the samples keep ``previous`` (or 0). Returns the (max_z,) references and the MAE of this
    per-element baseline on the fitted samples (eV/atom).
    """
    frac, e = _fractions(cache, indices, max_z)
    if len(e) == 0:
        raise ValueError("no energy labels to fit the AtomRef on")
    present = frac.sum(0) > 0
    ref = np.zeros(max_z) if previous is None else previous.detach().cpu().double().numpy().copy()
    sol, *_ = np.linalg.lstsq(frac[:, present], e, rcond=None)
    ref[present] = sol
    return ref, float(np.abs(frac @ ref - e).mean())


def model_energies(model: CHGNet, dataset: GraphDataset, *, batch_size: int = 16,
                   device: torch.device | str | None = None) -> np.ndarray:
    """Total energy (eV) of every structure of ``dataset`` by ``model`` *without* its AtomRef:
    one batched, no-grad, eval-mode pass with task ``"e"`` and the AtomRef zeroed meanwhile."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=EpochBatchSampler(len(dataset), batch_size, shuffle=False),
        collate_fn=Collator(dtype), num_workers=0)
    saved = model.atom_ref.detach().clone() if model.atom_ref is not None else None
    was_training = model.training
    out: list[np.ndarray] = []
    model.eval()
    try:
        if saved is not None:
            with torch.no_grad():
                model.atom_ref.zero_()
        with torch.no_grad():
            for batch, _, _ in DevicePrefetcher(loader, device, dtype):
                e = model(batch, task="e", create_graph=False)["e"].detach()
                if model.config.is_intensive:
                    e = e * batch.n_atoms.to(e.dtype)
                out.append(e.double().cpu().numpy())
    finally:
        if saved is not None:
            with torch.no_grad():
                model.atom_ref.copy_(saved)
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0)


def refit_atom_ref(cache: GraphCache, indices: Sequence[int], model_energy: np.ndarray,
                   previous: Tensor | np.ndarray, max_z: int = 94) -> tuple[np.ndarray, float, float]:
    """Per-element reference energies (MACE's E0s) refit to the residuals of a pretrained model.

    ``model_energy``: the total energies of the samples ``indices`` by the model without its
    AtomRef (:func:`model_energies`). Solves ``sum_Z n_Z E0_Z = E_label - E_model`` (totals, eV)
    by least squares over the per-element counts, as the change from ``previous`` (its minimum-norm
    solution when the compositions do not determine every element: an undetermined direction keeps
    the pretrained values). Elements absent from the samples keep ``previous``. Returns the
    (max_z,) references and the energy MAE (eV/atom) of the initial model before and after.
    """
    idx = np.asarray(indices, dtype=np.int64)
    counts = cache.composition_counts(max_z)[idx].astype(np.float64)
    n_atoms = counts.sum(1)
    label = cache.energies()[idx] * n_atoms  # per atom in the cache
    model_energy = np.asarray(model_energy, dtype=np.float64)
    if model_energy.shape != label.shape:
        raise ValueError(f"{len(model_energy)} model energies for {len(label)} samples")
    ok = np.isfinite(label) & np.isfinite(model_energy)
    if not ok.any():
        raise ValueError("no energy labels to refit the AtomRef on")
    old = (previous.detach().cpu().double().numpy() if isinstance(previous, Tensor)
           else np.asarray(previous, dtype=np.float64)).copy()
    counts, label, model_energy, n_atoms = counts[ok], label[ok], model_energy[ok], n_atoms[ok]
    present = counts.sum(0) > 0
    residual = label - model_energy - counts @ old  # what the pretrained AtomRef leaves
    delta, *_ = np.linalg.lstsq(counts[:, present], residual, rcond=None)
    new = old.copy()
    new[present] += delta
    before = float(np.abs(residual / n_atoms).mean())
    after = float(np.abs((label - model_energy - counts @ new) / n_atoms).mean())
    return new, before, after


def baseline_mae(cache: GraphCache, indices: Sequence[int], ref: np.ndarray) -> float:
    """MAE (eV/atom) of the per-element-reference energy ``sum_Z fraction_Z * ref_Z``."""
    frac, e = _fractions(cache, indices, len(ref))
    return float(np.abs(frac @ ref - e).mean()) if len(e) else float("nan")


def _fractions(cache: GraphCache, indices: Sequence[int], max_z: int) -> tuple[np.ndarray, np.ndarray]:
    """Element fractions (n, max_z) and energy labels (n,) of the samples that have an energy."""
    idx = np.asarray(indices, dtype=np.int64)
    counts = cache.composition_counts(max_z)[idx].astype(np.float64)
    e = cache.energies()[idx]
    ok = np.isfinite(e)
    return counts[ok] / counts[ok].sum(1, keepdims=True), e[ok]


# ------------------------------------------------------------------------------------------------
# freezing


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Named groups of parameter-name prefixes: ``embedding``, ``block0`` ... ``blockN``, ``magmom``,
    ``readout``."""
    n = getattr(getattr(model, "config", None), "n_conv", 0)
    groups = {"embedding": ["atom_embedding", "rbf_ag", "rbf_bg", "angle_basis", "bond_embed_ag",
                            "bond_weights_bg", "angle_embedding"],
              "magmom": ["site_wise"], "readout": ["readout_norm", "readout"]}
    for i in range(n):
        groups[f"block{i}"] = [f"atom_convs.{i}.", f"bond_convs.{i}.", f"angle_updates.{i}."]
    return groups


def freeze(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Fix (``requires_grad=False``) the parameters of the groups or name prefixes ``names``.

    A name is a group of :func:`parameter_groups` (``embedding``, ``block0``, ...) or a prefix of
    parameter names (``atom_convs.0``). Returns the frozen parameter names; a name that matches
    nothing raises ValueError.
    """
    groups = parameter_groups(model)
    params = dict(model.named_parameters())
    frozen: list[str] = []
    for name in names:
        prefixes = groups.get(name, [name])
        hit = [p for p in params if any(p == pre.rstrip(".") or p.startswith(pre.rstrip(".") + ".")
                                        for pre in prefixes)]
        if not hit:
            raise ValueError(f"freeze {name!r} matches no parameter; groups: {sorted(groups)}, "
                             f"or a prefix of: {sorted({p.split('.')[0] for p in params})}")
        for p in hit:
            params[p].requires_grad_(False)
            frozen.append(p)
    return sorted(set(frozen))
