"""The training loop, on one device or data-parallel over many (``torchrun``, see
:mod:`fastchgnet.train.distributed` and docs/distributed.md).

:func:`train` is the whole job behind ``fastchgnet train``: read the data into the graph cache,
split it, build (or load) the model, fit the AtomRef, train with Adam and a cosine schedule,
validate every epoch, write checkpoints and ``metrics.csv``, and at the end evaluate the best
checkpoint on the test set (``test.json`` and parity plots).

Run directory (``--out``)::

    config.json     the TrainConfig of the run
    split.json      the cache indices of the train / val / test samples
    train.log       the log
    metrics.csv     one row per epoch
    last.pt         model + optimiser + scheduler + epoch/step + RNG (written atomically)
    best.pt         the model with the lowest validation loss (loadable by load_model)
    test.json       test-set MAEs (and the per-element baseline) of best.pt
    parity_*.png    parity plots of energy, forces, stress and magnetic moments

Checkpoints are written at the end of every epoch (and every ``checkpoint_every`` steps when set)
with a temporary file and a rename, so a run killed at any moment resumes from an intact file.
Batches depend only on ``(seed, epoch)``: ``resume=True`` continues exactly where the checkpoint
was written, even in the middle of an epoch.

Distributed (launched by torchrun or SLURM with more than one process): ``batch_size`` is the
*global* batch, split over the ranks for every step by the load balancer
(:mod:`fastchgnet.train.balance`); the model is wrapped in DDP; rank 0 alone writes the log,
``metrics.csv`` and the checkpoints; validation is sharded over the ranks. The global batches do
not depend on the number of ranks, so a run may be resumed on a different number of them.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fastchgnet.data.cache import GraphCache, open_or_build
from fastchgnet.model.config import CHGNetConfig
from fastchgnet.model.exact import CHGNet
from fastchgnet.model.compile import check_first_order, compile_callable
from fastchgnet.model.weights import MODEL_TYPES, load_model, save_checkpoint
from fastchgnet.train.balance import POLICIES, DistributedBatchSampler, sample_costs
from fastchgnet.train.data import Collator, DevicePrefetcher, EpochBatchSampler, GraphDataset, split_indices
from fastchgnet.train.ema import EMA
from fastchgnet.train.distributed import (
    DEFAULT_TIMEOUT_S,
    DistEnv,
    DistributedTrainingError,
    global_loss,
    init_distributed,
    maybe_inject_fault,
    rank_ordered,
    shutdown,
)
from fastchgnet.train.loss import DEFAULT_PREFACTORS, EFSMLoss, MAEAccumulator
from fastchgnet.train.schedule import default_lr, make_optimizer, make_scheduler

__all__ = ["TrainConfig", "Trainer", "evaluate", "fit_atom_ref", "freeze", "prepare_data", "train"]

PRECISIONS = ("fp32", "fp64", "tf32")
METRIC_COLUMNS = ("epoch", "step", "time_s", "lr", "train_loss", "val_loss", "val_e_mae",
                  "val_f_mae", "val_s_mae", "val_m_mae", "structures_per_s", "load_cv")
STATE_VERSION = 1


@dataclass
class TrainConfig:
    """Everything that defines a training run (the ``fastchgnet train`` options).

    ``batch_size`` is the number of structures per optimiser step: the *global* batch, summed over
    all ranks of a distributed run (on one device, simply the batch). ``lr=None`` takes the
    paper's rule ``batch_size / 128 * 3e-4`` on that global batch. ``data=None`` trains on the built-in
    dataset. ``val_data`` / ``test_data`` replace the random split's validation / test parts.
    """

    data: str | None = None
    format: str = "auto"
    val_data: str | None = None
    test_data: str | None = None
    split: tuple[float, float, float] = (0.9, 0.05, 0.05)
    limit: int | None = None  # use only this many samples of `data` (quick runs)
    model: str = "exact"
    model_config: dict[str, Any] = field(default_factory=dict)  # CHGNetConfig overrides
    init: str | None = None  # "0.3.0" or a checkpoint: fine-tune from these weights
    freeze: tuple[str, ...] = ()  # parameter groups or name prefixes kept fixed
    refit_atom_ref: bool = False  # with init: refit the AtomRef on the training set
    epochs: int = 10
    batch_size: int = 16
    lr: float | None = None
    min_lr_ratio: float = 0.01
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = None
    ema_decay: float | None = None  # validate and save a moving average of the weights (e.g. 0.99)
    loss: str = "huber"
    delta: float = 0.1
    prefactors: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PREFACTORS))
    # stage two (as MACE's): after `stage_two_start` epochs, train with these prefactors (the ones
    # not given keep their stage-one value) and, when set, the constant learning rate stage_two_lr
    stage_two_start: int | None = None
    stage_two_prefactors: dict[str, float] | None = None
    stage_two_lr: float | None = None
    precision: str = "fp32"
    seed: int = 0
    device: str = "auto"
    out: str = "runs/train"
    cache: str | None = None  # graph cache root (default: $FASTCHGNET_CACHE or ~/.cache/fastchgnet)
    workers: int | None = None  # DataLoader workers (default: 0 on CPU, 4 on CUDA)
    cache_workers: int | None = None  # processes that build the graph cache (default: all CPUs)
    skip_bad: bool = False
    checkpoint_every: int = 0  # also write last.pt every N steps (0: only at epoch ends)
    eval_batch_size: int | None = None
    progress: bool = True
    plots: bool = True
    resume: bool = False
    compile: str | None = None  # torch.compile backend ("inductor", ...) for a heads model's step
    # distributed runs only (ignored by a single process)
    balance: str = "greedy"  # split of each global batch over the ranks: none, paper, greedy
    bucket_mb: float | None = None  # DDP gradient bucket size (None: torch's 1 MiB first, then 25)
    dist_timeout: float = DEFAULT_TIMEOUT_S  # seconds any collective may wait before failing
    log_every: int = 0  # log loss and load CV every N steps (0: only per epoch)

    def __post_init__(self) -> None:
        self.split = tuple(float(x) for x in self.split)  # type: ignore[assignment]
        self.freeze = tuple(self.freeze)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: use one of {PRECISIONS}")
        if self.model not in MODEL_TYPES:
            raise ValueError(f"unknown model {self.model!r}; known: {sorted(MODEL_TYPES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch size must be >= 1 (got {self.epochs}, {self.batch_size})")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive, got {self.grad_clip}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.init is not None and self.model_config:
            raise ValueError("model_config overrides cannot be combined with init (the checkpoint "
                             "defines the architecture)")
        if self.balance not in POLICIES:
            raise ValueError(f"unknown balance policy {self.balance!r}; use one of {POLICIES}")
        if self.bucket_mb is not None and not self.bucket_mb > 0:
            raise ValueError(f"bucket_mb must be positive, got {self.bucket_mb}")
        if not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout must be positive, got {self.dist_timeout}")
        unknown = set(self.prefactors) - set(DEFAULT_PREFACTORS)
        if unknown:
            raise ValueError(f"unknown loss prefactors {sorted(unknown)}; use e, f, s, m")
        if self.stage_two_start is None:
            if self.stage_two_prefactors is not None or self.stage_two_lr is not None:
                raise ValueError("stage_two_prefactors and stage_two_lr need stage_two_start (the "
                                 "number of epochs before stage two)")
        else:
            if not 0 <= self.stage_two_start < self.epochs:
                raise ValueError(f"stage_two_start must be in [0, epochs={self.epochs}), "
                                 f"got {self.stage_two_start}")
            unknown = set(self.stage_two_prefactors or {}) - set(DEFAULT_PREFACTORS)
            if unknown:
                raise ValueError(f"unknown stage-two loss prefactors {sorted(unknown)}; use e, f, s, m")
            for k, w in (self.stage_two_prefactors or {}).items():
                if not (math.isfinite(w) and w >= 0):
                    raise ValueError(f"stage-two prefactor {k!r} must be finite and non-negative, "
                                     f"got {w}")
            if self.stage_two_lr is not None and not self.stage_two_lr > 0:
                raise ValueError(f"stage_two_lr must be positive, got {self.stage_two_lr}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else default_lr(self.batch_size)

    def stage_prefactors(self, epoch: int) -> dict[str, float]:
        """The loss prefactors of the epoch after ``epoch`` completed ones."""
        pref = {**DEFAULT_PREFACTORS, **self.prefactors}
        if self.stage_two_start is not None and epoch >= self.stage_two_start:
            pref.update(self.stage_two_prefactors or {})
        return pref

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["split"] = list(self.split)
        d["freeze"] = list(self.freeze)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {sorted(unknown)}")
        return cls(**d)


# ------------------------------------------------------------------------------------------------
# data


def default_cache_root() -> Path:
    env = os.environ.get("FASTCHGNET_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fastchgnet" / "graphs"


def prepare_data(path: str | None, *, format: str = "auto", cache_root: str | os.PathLike | None = None,
                 skip_bad: bool = False, atom_cutoff: float = 6.0, bond_cutoff: float = 3.0,
                 workers: int | None = None, log: Callable[[str], None] = print) -> GraphCache:
    """The graph cache of a dataset file (``None``: the built-in dataset), built on first use.

    Bad entries stop with an error naming the file and entry, or with ``skip_bad`` are left out
    and counted (the counts are logged and kept in the cache's ``meta.json``).
    """
    from fastchgnet.data.readers import read_dataset

    root = Path(cache_root) if cache_root is not None else default_cache_root()
    stats: dict[str, Any] = {}
    if path is None:
        from fastchgnet.data.builtin import builtin_dataset_path, read_builtin

        source = builtin_dataset_path()

        def samples() -> Iterator[Any]:
            return read_builtin(source, skip_bad=skip_bad, stats=stats)
        fmt = "builtin"
    else:
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"dataset {path} does not exist (or is not a file)")

        def samples() -> Iterator[Any]:
            return read_dataset(source, format=format, skip_bad=skip_bad, stats=stats)  # type: ignore[arg-type]
        fmt = format

    def meta_extra() -> dict[str, Any]:
        return {"source": str(source), "reader": dict(stats)}

    t0 = time.perf_counter()
    cache = open_or_build(samples, source, root, options={"format": fmt}, atom_cutoff=atom_cutoff,
                          bond_cutoff=bond_cutoff, workers=workers, skip_bad=skip_bad,
                          meta_extra=meta_extra)
    built = time.perf_counter() - t0
    reader = cache.meta.get("reader", {})
    msg = f"data {source}: {len(cache)} samples (graph cache {cache.path}, {built:.1f} s)"
    n_skip = int(reader.get("skipped", 0)) + len(cache.skipped)
    if n_skip:
        reasons = dict(reader.get("reasons", {}))
        if cache.skipped:
            reasons["graph"] = reasons.get("graph", 0) + len(cache.skipped)
        msg += f"; skipped {n_skip} bad entries {reasons}"
    log(msg)
    if len(cache) == 0:
        raise ValueError(f"{source}: no usable samples")
    return cache


# ------------------------------------------------------------------------------------------------
# model set-up: AtomRef fit and freezing


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


def build_model(cfg: TrainConfig) -> CHGNet:
    if cfg.init is not None:
        model = load_model(cfg.init)
        if model.model_type != cfg.model:
            cls = MODEL_TYPES[cfg.model]
            converted = cls(model.config)
            res = converted.load_state_dict(model.state_dict(), strict=False)
            if res.unexpected_keys:
                raise ValueError(f"--init {cfg.init}: its weights do not fit a {cfg.model!r} model "
                                 f"(unexpected {res.unexpected_keys[:5]})")
            converted.version = model.version
            model = converted  # parameters the checkpoint lacks (e.g. new heads) keep their init
        return model
    return MODEL_TYPES[cfg.model](CHGNetConfig(**cfg.model_config))


def resolve_device(name: str) -> torch.device:
    from fastchgnet.bench import resolve_device as resolve

    return torch.device(resolve(name))


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """TF32 matmuls for the duration of a run (restored afterwards; nothing global on import)."""
    if precision != "tf32":
        yield
        return
    if device.type != "cuda":
        raise ValueError("precision tf32 needs a CUDA device (TF32 is a GPU tensor-core format)")
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ------------------------------------------------------------------------------------------------
# evaluation


def evaluate(model: CHGNet, dataset: GraphDataset, *, batch_size: int = 32,
             device: torch.device | str | None = None, task: str = "efsm",
             loss_fn: EFSMLoss | None = None, collect: bool = False,
             workers: int = 0, env: DistEnv | None = None) -> dict[str, Any]:
    """MAEs (and the weighted loss) of ``model`` on ``dataset``; forces by autograd, no
    second-order graph. With ``collect=True`` also the labelled predictions and labels as numpy
    arrays (``pred_e``/``true_e``, ...) for parity plots. With ``env`` (a distributed run, every
    rank calls it) each rank evaluates every ``world_size``-th sample and the sums are reduced."""
    if env is not None:
        if collect:
            raise ValueError("collect=True is not supported in a distributed evaluation")
        dataset = dataset.subset(np.arange(env.rank, len(dataset), env.world_size))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    loss_fn = loss_fn or EFSMLoss()
    acc = MAEAccumulator()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_struct = 0
    pairs: dict[str, list[np.ndarray]] = {f"{p}_{k}": [] for k in "efsm" for p in ("pred", "true")}
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=EpochBatchSampler(len(dataset), batch_size, shuffle=False),
        collate_fn=Collator(dtype), num_workers=workers, pin_memory=device.type == "cuda")
    try:
        for batch, targets, _ in DevicePrefetcher(loader, device, dtype):
            pred = model(batch, task=task, create_graph=False)
            pred = {k: v.detach() for k, v in pred.items()}
            loss, _ = loss_fn(pred, targets)
            loss_sum += loss.detach().double() * batch.num_graphs
            n_struct += batch.num_graphs
            acc.update(pred, targets)
            if collect:
                _collect(pairs, pred, targets)
    finally:
        model.train(was_training)
    if env is not None:
        n_struct = _reduce_eval(env, acc, loss_sum, n_struct, device)
    out: dict[str, Any] = {"n": n_struct, "loss": float(loss_sum) / max(n_struct, 1), **acc.compute()}
    if collect:
        out.update({k: (np.concatenate(v) if v else np.zeros(0)) for k, v in pairs.items()})
    return out


def _reduce_eval(env: DistEnv, acc: MAEAccumulator, loss_sum: Tensor, n_struct: int,
                 device: torch.device) -> int:
    """Sum the loss, structure count and MAE sums/counts of all ranks (in place); returns the
    global number of structures. One all-reduce of 10 numbers."""
    k = 4
    sums = acc._sums if acc._sums is not None else torch.zeros(k, dtype=torch.float64, device=device)
    counts = acc._counts if acc._counts is not None else torch.zeros(k, dtype=torch.int64, device=device)
    packed = torch.cat([loss_sum.reshape(1).double(), torch.tensor([float(n_struct)], device=device,
                                                                   dtype=torch.float64),
                        sums.double(), counts.double()])
    env.all_reduce(packed)
    loss_sum.copy_(packed[0])
    acc._sums, acc._counts = packed[2:2 + k].to(sums.dtype), packed[2 + k:].round().to(torch.int64)
    return int(packed[1])


def _collect(pairs: dict[str, list[np.ndarray]], pred: dict[str, Tensor], targets: Any) -> None:
    ag = targets.atom_graph
    for key in "efsm":
        p, y = pred.get(key), getattr(targets, key)
        if p is None or y is None:
            continue
        mask = getattr(targets, f"{key}_mask")
        if key == "f" and mask is not None:
            mask = mask.index_select(0, ag)
        if mask is None:
            mask = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
        pairs[f"pred_{key}"].append(p[mask].reshape(-1).double().cpu().numpy())
        pairs[f"true_{key}"].append(y[mask].reshape(-1).double().cpu().numpy())


# ------------------------------------------------------------------------------------------------
# the trainer


def _wrap_ddp(model: nn.Module, config: TrainConfig) -> nn.Module:
    """``model`` in DistributedDataParallel (the process group must exist).

    ``find_unused_parameters``: some parameters get no gradient in a step (the last block's angle
    update always; the bond-graph parameters when no structure of the batch has an angle). DDP
    then finds them by walking the step's autograd graph and leaves the gradient of a parameter
    unused on every rank at None, as a single process would (so Adam skips it the same way).
    Buffers are synced once, at construction (they do not change in training), not every step;
    ``config.bucket_mb`` sets the gradient bucket size (None: torch's default).
    """
    import inspect

    DDP = nn.parallel.DistributedDataParallel
    kw: dict[str, Any] = {} if config.bucket_mb is None else {"bucket_cap_mb": config.bucket_mb}
    if "forward_sync_buffers" in inspect.signature(DDP).parameters:
        kw["forward_sync_buffers"] = False
    else:  # older torch
        kw["broadcast_buffers"] = False
    return DDP(model, device_ids=None, find_unused_parameters=True, **kw)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    """Trains ``model`` on ``train_set``, validating on ``val_set`` every epoch.

    Use :func:`train` for the whole job from a :class:`TrainConfig`; use ``Trainer`` directly
    from Python with your own model and datasets::

        trainer = Trainer(model, TrainConfig(epochs=5, batch_size=8, out="runs/x"), train_ds, val_ds)
        history = trainer.fit()

    With ``dist`` (from :func:`~fastchgnet.train.distributed.init_distributed`; every rank builds
    its Trainer the same way) the model is wrapped in DDP and each rank trains on its balanced
    share of every global batch of ``config.batch_size`` structures.
    """

    def __init__(self, model: CHGNet, config: TrainConfig, train_set: GraphDataset,
                 val_set: GraphDataset | None = None, *, log: Callable[[str], None] | None = None,
                 stop_after_steps: int | None = None, dist: DistEnv | None = None) -> None:
        self.cfg = config
        self.dist = dist
        self.is_main = dist is None or dist.is_main
        self.device = dist.device if dist is not None else resolve_device(config.device)
        self.dtype = torch.float64 if config.precision == "fp64" else torch.float32
        self.collator = Collator(self.dtype)
        self.model = model.to(self.device, self.dtype)
        self.train_set, self.val_set = train_set, val_set
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = run_logger(self.out, log) if self.is_main else (lambda msg: None)
        # for tests: stop (as if killed) after this many optimiser steps of this process
        self.stop_after_steps = stop_after_steps
        self.loss_fn = EFSMLoss(**config.prefactors, delta=config.delta, loss=config.loss)
        self.sampler: EpochBatchSampler | DistributedBatchSampler
        self.ddp: nn.Module | None = None
        if dist is None:
            self.sampler = EpochBatchSampler(len(train_set), config.batch_size, shuffle=True,
                                             seed=config.seed)
        else:
            # costs of every training sample (3 numbers each, from the cache's pointers): each rank
            # partitions every global batch the same way without communicating
            self.sampler = DistributedBatchSampler(
                sample_costs(train_set.sizes()), config.batch_size, dist.world_size, dist.rank,
                policy=config.balance, seed=config.seed)
            self.ddp = _wrap_ddp(self.model, config)
        self._forward: Callable[..., dict[str, Tensor]] = self.ddp if self.ddp is not None else self.model
        if config.compile:
            check_first_order(self.model, "--compile")
            # distributed: the DDP module is compiled (dynamo splits the graph at the gradient
            # buckets, so the all-reduce still overlaps the backward): no fullgraph
            self._forward = compile_callable(self._forward, backend=config.compile,
                                             fullgraph=self.ddp is None)
        self.steps_per_epoch = len(self.sampler)
        self.optimizer = make_optimizer(self.model, config.learning_rate, config.weight_decay)
        two = config.stage_two_start is not None and config.stage_two_lr is not None
        self.scheduler = make_scheduler(
            self.optimizer, total_steps=config.epochs * self.steps_per_epoch,
            warmup_steps=config.warmup_steps, min_lr_ratio=config.min_lr_ratio,
            const_from=config.stage_two_start * self.steps_per_epoch if two else None,  # type: ignore[operator]
            const_ratio=config.stage_two_lr / config.learning_rate if two else 1.0)  # type: ignore[operator]
        # averaged weights (after any freezing: frozen parameters are not averaged)
        self.ema = EMA(self.model, config.ema_decay) if config.ema_decay is not None else None
        self.epoch = 0  # completed epochs
        self.step = 0  # optimiser steps taken
        self.step_in_epoch = 0
        self.best_val = math.inf
        self._epoch_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self._epoch_count = 0
        self._epoch_time = 0.0
        workers = config.workers if config.workers is not None else (4 if self.device.type == "cuda" else 0)
        self.workers = workers
        self._train_loader: torch.utils.data.DataLoader | None = None

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"state_version": STATE_VERSION, "epoch": self.epoch, "step": self.step,
                "step_in_epoch": self.step_in_epoch, "best_val": self.best_val,
                "epoch_loss": self._epoch_loss.detach().cpu(), "epoch_count": self._epoch_count,
                "epoch_time": self._epoch_time, "steps_per_epoch": self.steps_per_epoch,
                "world_size": self.dist.world_size if self.dist is not None else 1,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(self.device), "train_config": self.cfg.to_dict(),
                **({"ema": self.ema.state_dict()} if self.ema is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("state_version") != STATE_VERSION:
            raise ValueError(f"unsupported trainer state version {state.get('state_version')!r}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.step_in_epoch = int(state["step_in_epoch"])
        saved_steps = int(state.get("steps_per_epoch", self.steps_per_epoch))
        if self.step_in_epoch and saved_steps != self.steps_per_epoch:
            raise ValueError(
                f"cannot resume in the middle of epoch {self.epoch + 1}: it had {saved_steps} steps "
                f"with {state.get('world_size', 1)} rank(s) and has {self.steps_per_epoch} now (the "
                "short last batch is merged differently); resume with the former number of ranks")
        self.best_val = float(state["best_val"])
        # the saved running loss is the sum over all ranks: rank 0 carries it on
        self._epoch_loss = state["epoch_loss"].to(self.device, torch.float64)
        if not self.is_main:
            self._epoch_loss.zero_()
        self._epoch_count = int(state["epoch_count"])
        self._epoch_time = float(state.get("epoch_time", 0.0))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # --epochs may have grown: the cosine runs to the new total
        total = self.cfg.epochs * self.steps_per_epoch
        for lam in self.scheduler.lr_lambdas:
            if hasattr(lam, "total_steps") and lam.total_steps != total:
                lam.total_steps = max(total, lam.warmup_steps)
        _set_rng_state(state.get("rng", {}), self.device)
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError("the trainer state has no EMA weights (the run was saved without "
                                 "ema_decay); resume it with the same ema_decay")
            self.ema.load_state_dict(state["ema"])

    def save(self, path: Path, **extra: Any) -> Path:
        """Model checkpoint (loadable by :func:`load_model`) plus the trainer state, atomically.
        Distributed: every rank calls it (the running loss is summed over the ranks), rank 0
        alone writes."""
        self._sync_epoch_loss()
        if self.is_main:
            save_checkpoint(self.model, path, trainer=self.state_dict(), **extra)
        return path

    def _sync_epoch_loss(self) -> Tensor:
        """The epoch's running loss summed over the ranks (returned on every rank). Distributed:
        rank 0 keeps the sum and the others zero, so the sum over the ranks is unchanged."""
        if self.dist is None:
            return self._epoch_loss
        self.dist.all_reduce(self._epoch_loss)
        total = self._epoch_loss.clone()
        if not self.is_main:
            self._epoch_loss.zero_()
        return total

    def resume_from(self, path: str | os.PathLike) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if "trainer" not in ckpt:
            raise ValueError(f"{path} has no trainer state (is it a best.pt or a model file?)")
        self.model.load_state_dict(ckpt["state_dict"])
        self.model.to(self.device, self.dtype)
        self.load_state_dict(ckpt["trainer"])

    # -- loop ----------------------------------------------------------------------------------
    def _loader(self) -> torch.utils.data.DataLoader:
        """One DataLoader for the whole run: its workers persist across epochs (the batch
        sampler runs in this process, so ``set_epoch``/``skip`` take effect at each iteration)."""
        if self._train_loader is None:
            kw: dict[str, Any] = {}
            if self.workers > 0:
                kw.update(persistent_workers=True, prefetch_factor=4)
            self._train_loader = torch.utils.data.DataLoader(
                self.train_set, batch_sampler=self.sampler, collate_fn=self.collator,
                num_workers=self.workers, pin_memory=self.device.type == "cuda", **kw)
        return self._train_loader

    def train_step(self, batch: Any, targets: Any) -> Tensor:
        """One optimiser step; returns the loss (a device tensor, no host sync). Distributed:
        this rank's share of the global batch's loss (the shares of all ranks sum to it)."""
        self.model.train()
        pred = self._forward(batch, task="efsm", create_graph=True)
        if self.dist is None:
            loss, _ = self.loss_fn(pred, targets)
            share = loss
        else:
            loss, share = global_loss(self.loss_fn, pred, targets, self.dist)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        return share.detach()

    def averaged(self) -> contextlib.AbstractContextManager[None]:
        """Context in which the model holds the weights that are validated and saved as best.pt:
        the moving average with ``ema_decay``, else the current weights."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def validate(self) -> dict[str, Any]:
        if self.val_set is None or len(self.val_set) == 0:
            return {"loss": float("nan"), "e_mae": float("nan"), "f_mae": float("nan"),
                    "s_mae": float("nan"), "m_mae": float("nan"), "n": 0}
        per_rank = max(1, self.cfg.batch_size // (self.dist.world_size if self.dist else 1))
        with self.averaged():
            return evaluate(self.model, self.val_set, batch_size=self.cfg.eval_batch_size or 2 * per_rank,
                            device=self.device, loss_fn=self.loss_fn, env=self.dist)

    def fit(self) -> list[dict[str, Any]]:
        """Train up to ``config.epochs`` epochs (from the current state); returns the metric rows
        of the epochs run now. Returns early (as if killed) after ``stop_after_steps`` steps."""
        from tqdm.auto import tqdm

        rows: list[dict[str, Any]] = []
        with precision_context(self.cfg.precision, self.device):
            while self.epoch < self.cfg.epochs:
                e = self.epoch
                self._set_stage(e, starting=self.step_in_epoch == 0)
                self.sampler.set_epoch(e)
                start = self.step_in_epoch
                self.sampler.skip(start)
                if start == 0:
                    self._epoch_loss.zero_()
                    self._epoch_count, self._epoch_time = 0, 0.0
                # host-side facts of every step, known without communication: samples of the global
                # batch and the CV of the per-rank costs (0 on one device)
                dist_sampler = self.sampler if isinstance(self.sampler, DistributedBatchSampler) else None
                n_global = dist_sampler.global_sizes() if dist_sampler is not None else None
                t0 = time.perf_counter()
                bar = tqdm(total=self.steps_per_epoch, initial=start, desc=f"epoch {e + 1}/{self.cfg.epochs}",
                           disable=not (self.cfg.progress and self.is_main), leave=False,
                           dynamic_ncols=True, unit="step", file=sys.stderr)
                for batch, targets, _ in DevicePrefetcher(self._loader(), self.device, self.dtype):
                    loss = self.train_step(batch, targets)
                    n = batch.num_graphs if n_global is None else int(n_global[self.step_in_epoch])
                    cv = 0.0 if dist_sampler is None else dist_sampler.cv(self.step_in_epoch)
                    self._epoch_loss += loss.double() * n
                    self._epoch_count += n
                    self.step += 1
                    self.step_in_epoch += 1
                    maybe_inject_fault(self.dist, self.step)
                    bar.update(1)
                    # distributed: rank 0's share times the number of ranks estimates the loss
                    # without a collective (the exact epoch loss is reduced at the epoch's end)
                    scale = 1 if self.dist is None else self.dist.world_size
                    if self.cfg.progress and self.is_main and (self.step_in_epoch % 10 == 0):
                        running = scale * float(self._epoch_loss) / max(self._epoch_count, 1)
                        bar.set_postfix(loss=f"{running:.4f}", load_cv=f"{cv:.3f}")
                    if self.cfg.log_every and self.step % self.cfg.log_every == 0:
                        what = "loss" if self.dist is None else "loss (rank 0 share x ranks)"
                        self.log(f"step {self.step}  {what} {scale * float(loss):.4f}  load_cv {cv:.4f}")
                    if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 \
                            and self.step_in_epoch < self.steps_per_epoch:
                        self._epoch_time += time.perf_counter() - t0
                        t0 = time.perf_counter()
                        self.save(self.out / "last.pt")
                    if self.stop_after_steps is not None and self.step >= self.stop_after_steps:
                        bar.close()
                        return rows
                bar.close()
                self._epoch_time += time.perf_counter() - t0
                row = self._end_epoch()
                rows.append(row)
        return rows

    def _set_stage(self, epoch: int, starting: bool) -> None:
        """Loss prefactors of the epoch after ``epoch`` completed ones. At the first step of stage
        two the best validation loss is forgotten: it was measured with other prefactors, so
        best.pt is the best model of stage two."""
        self.loss_fn.prefactors.update(self.cfg.stage_prefactors(epoch))
        if starting and epoch == self.cfg.stage_two_start:
            self.best_val = math.inf
            w = ", ".join(f"{k}={v:g}" for k, v in self.loss_fn.prefactors.items())
            lr = (f", constant lr {self.cfg.stage_two_lr:.2e}" if self.cfg.stage_two_lr is not None
                  else "")
            self.log(f"stage two from epoch {epoch + 1}: prefactors {w}{lr}")

    def _end_epoch(self) -> dict[str, Any]:
        train_loss = float(self._sync_epoch_loss()) / max(self._epoch_count, 1)
        load = (float(self.sampler.step_cv().mean())
                if isinstance(self.sampler, DistributedBatchSampler) else 0.0)
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"epoch {self.epoch + 1}: training loss is {train_loss}; lower the learning rate "
                "(--lr) or set --grad-clip; last.pt still holds the previous epoch")
        val = self.validate()
        self.epoch += 1
        self.step_in_epoch = 0
        row = {"epoch": self.epoch, "step": self.step, "time_s": self._epoch_time,
               "lr": self.optimizer.param_groups[0]["lr"], "train_loss": train_loss,
               "val_loss": val["loss"], "val_e_mae": val["e_mae"], "val_f_mae": val["f_mae"],
               "val_s_mae": val["s_mae"], "val_m_mae": val["m_mae"],
               "structures_per_s": self._epoch_count / max(self._epoch_time, 1e-9), "load_cv": load}
        if self.is_main:
            self._write_metrics(row)
        improved = math.isfinite(val["loss"]) and val["loss"] < self.best_val
        if improved:
            self.best_val = val["loss"]
        self.save(self.out / "last.pt")
        if self.is_main and (improved or not (self.out / "best.pt").exists()):
            with self.averaged():
                save_checkpoint(self.model, self.out / "best.pt", epoch=self.epoch, val=val,
                                **({"ema_decay": self.ema.decay} if self.ema is not None else {}))
        self.log(f"epoch {self.epoch:>3}/{self.cfg.epochs}  {row['time_s']:7.1f} s  lr {row['lr']:.2e}  "
                 f"train {train_loss:.4f}  val {val['loss']:.4f}  MAE e {_fmt(val['e_mae'] * 1e3)} meV/atom  "
                 f"f {_fmt(val['f_mae'] * 1e3)} meV/A  s {_fmt(val['s_mae'])} GPa  m {_fmt(val['m_mae'])} muB"
                 + (f"  load_cv {load:.3f}" if self.dist is not None else "") + ("  *" if improved else ""))
        return row

    def _write_metrics(self, row: dict[str, Any]) -> None:
        path = self.out / "metrics.csv"
        rows = read_metrics(path)
        rows = [r for r in rows if int(r["epoch"]) < row["epoch"]]  # drop rows a resumed run redoes
        rows.append({k: row[k] for k in METRIC_COLUMNS})
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow(r)
        os.replace(tmp, path)


def run_logger(out: Path, log: Callable[[str], None] | None = None) -> Callable[[str], None]:
    """A log function for a run: ``log`` (default: print) and a line appended to out/train.log."""
    def _log(msg: str) -> None:
        (log or (lambda m: print(m, flush=True)))(msg)
        with open(out / "train.log", "a") as fh:
            fh.write(msg + "\n")
    return _log


def _json_safe(obj: Any) -> Any:
    """NaN/inf (a target without labels) as null, so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _fmt(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:.3g}"


def read_metrics(path: str | os.PathLike) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------------
# the whole job


def train(config: TrainConfig | None = None, *, log: Callable[[str], None] | None = None,
          stop_after_steps: int | None = None, **overrides: Any) -> dict[str, Any]:
    """Run a training job (``fastchgnet train``); returns the test metrics (``test.json``).

    ``train(epochs=3, batch_size=8, out="runs/x")`` or ``train(TrainConfig(...))``. With
    ``resume=True`` the run in ``out`` continues from its ``last.pt`` up to ``epochs``; the other
    options are taken from the saved run (a differing ``epochs`` extends or shortens it).

    Launched by torchrun (or SLURM) with several processes, every process calls this: they join
    one process group (NCCL on CUDA, gloo on the CPU) and train data-parallel; rank 0 returns the
    test metrics, the other ranks ``{}``. A failure on any rank (a rank that died, a collective past
    ``dist_timeout``) raises :class:`DistributedTrainingError` naming the rank and the checkpoint to
    resume from.
    """
    if config is None:
        config = TrainConfig(**overrides)
    elif overrides:
        config = TrainConfig.from_dict({**config.to_dict(), **overrides})
    out = Path(config.out)
    last = out / "last.pt"
    if config.resume:
        if not last.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint {last}")
        saved = torch.load(last, map_location="cpu", weights_only=True)["trainer"]["train_config"]
        # options that may change on resume (the number of ranks may change too)
        keep = {k: getattr(config, k) for k in ("epochs", "progress", "device", "workers", "plots",
                                                 "balance", "bucket_mb", "dist_timeout", "log_every",
                                                 "compile")}
        config = TrainConfig.from_dict({**saved, **keep, "resume": True})
    elif last.is_file():
        raise FileExistsError(f"{out} already holds a run (last.pt): pass --resume to continue it "
                              "or choose another --out")
    env = init_distributed(config.device, config.dist_timeout)
    if env is None:
        return _train(config, None, log, stop_after_steps)
    try:
        result = _train(config, env, log, stop_after_steps)
    except Exception as exc:
        step = _checkpoint_step(last)
        raise DistributedTrainingError(
            f"rank {env.rank} of {env.world_size}: training stopped ({type(exc).__name__}: {exc}). "
            "If another rank died or hung, its own error is in its log; a collective waits at most "
            f"--dist-timeout {config.dist_timeout:g} s. The last checkpoint "
            + (f"{last} (step {step}) is intact: continue with --resume, on any number of ranks."
               if step is not None else f"{last} was not written yet.")) from exc
    shutdown(env)
    return result


def _checkpoint_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["trainer"]["step"])
    except Exception:  # absent or unreadable: reported as not written
        return None


def _train(config: TrainConfig, env: DistEnv | None, log: Callable[[str], None] | None,
           stop_after_steps: int | None) -> dict[str, Any]:
    """The job of :func:`train` on this process (``env``: its place in a distributed run)."""
    main = env is None or env.is_main
    out = Path(config.out)
    last = out / "last.pt"
    out.mkdir(parents=True, exist_ok=True)
    if main:
        for stale in out.glob("*.tmp"):  # partial writes of a killed run (the real files are intact)
            stale.unlink()
    _log = run_logger(out, log) if main else (lambda msg: None)
    if env is not None:
        _log(f"distributed: {env.world_size} ranks, backend {env.backend}, global batch "
             f"{config.batch_size} (~{config.batch_size / env.world_size:.1f} per rank), "
             f"balance {config.balance}")

    torch.manual_seed(config.seed)
    model = build_model(config)
    cutoffs = {"atom_cutoff": model.config.atom_graph_cutoff, "bond_cutoff": model.config.bond_graph_cutoff}
    data_kw = dict(format=config.format, cache_root=config.cache, skip_bad=config.skip_bad,
                   workers=config.cache_workers, log=_log, **cutoffs)

    def data() -> tuple[GraphCache, GraphCache | None, GraphCache | None]:
        extra = {**data_kw, "format": "auto"}
        return (prepare_data(config.data, **data_kw),
                prepare_data(config.val_data, **extra) if config.val_data is not None else None,
                prepare_data(config.test_data, **extra) if config.test_data is not None else None)

    # distributed: rank 0 builds the graph cache, the others open it (each reads only its samples)
    cache, val_cache, test_cache = rank_ordered(env, data)
    n = len(cache) if config.limit is None else min(config.limit, len(cache))
    fractions = list(config.split)
    if config.val_data is not None:
        fractions[0] += fractions[1]
        fractions[1] = 0.0
    if config.test_data is not None:
        fractions[0] += fractions[2]
        fractions[2] = 0.0
    tr, va, te = split_indices(n, fractions, seed=config.seed)
    train_set = GraphDataset(cache, tr)
    val_set = GraphDataset(val_cache) if val_cache is not None else GraphDataset(cache, va)
    test_set = GraphDataset(test_cache) if test_cache is not None else GraphDataset(cache, te)
    if main:
        (out / "split.json").write_text(json.dumps({"cache": str(cache.path), "train": tr.tolist(),
                                                    "val": va.tolist(), "test": te.tolist()}))
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")

    # the AtomRef fit reads the composition of the whole training set: rank 0 only (DDP broadcasts
    # rank 0's parameters, the AtomRef included, when it wraps the model)
    if not config.resume and main:
        if model.atom_ref is not None and (config.init is None or config.refit_atom_ref):
            ref, mae = fit_atom_ref(cache, tr, model.config.max_num_elements,
                                    previous=model.atom_ref if config.init is not None else None)
            with torch.no_grad():
                model.atom_ref.copy_(torch.as_tensor(ref, dtype=model.atom_ref.dtype))
            _log(f"AtomRef fitted on {len(tr)} training structures: baseline MAE {mae * 1e3:.1f} meV/atom")
    if config.freeze:
        frozen = freeze(model, config.freeze)
        _log(f"frozen: {len(frozen)} parameter tensors ({', '.join(config.freeze)})")

    trainer = Trainer(model, config, train_set, val_set, log=log, stop_after_steps=stop_after_steps,
                      dist=env)
    if config.resume:
        trainer.resume_from(last)
        _log(f"resumed {last}: epoch {trainer.epoch}, step {trainer.step} "
             f"({trainer.step_in_epoch} steps into the epoch)")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _log(f"model {config.model}: {n_train:,} trainable parameters; {len(train_set)} train / "
         f"{len(val_set)} val / {len(test_set)} test structures; batch {config.batch_size}, "
         f"lr {config.learning_rate:.3g}, {trainer.steps_per_epoch} steps/epoch, {config.epochs} epochs, "
         f"{trainer.device}, {config.precision}")
    trainer.fit()
    if env is not None:
        env.barrier()  # every rank done and the last checkpoint written
    if stop_after_steps is not None and trainer.epoch < config.epochs:
        return {}
    if not main:
        return {}
    return finish(trainer, cache, test_set, tr, log=_log)


def finish(trainer: Trainer, cache: GraphCache, test_set: GraphDataset, train_indices: np.ndarray,
           *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate best.pt on the test set; write test.json and the parity plots."""
    out = trainer.out
    cfg = trainer.cfg
    best = load_model(out / "best.pt", device=trainer.device)
    result: dict[str, Any] = {"checkpoint": str(out / "best.pt"), "n_test": len(test_set)}
    if len(test_set):
        res = evaluate(best, test_set, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                       device=trainer.device, loss_fn=trainer.loss_fn, collect=True)
        result.update({k: res[k] for k in ("loss", "e_mae", "f_mae", "s_mae", "m_mae")})
        if best.atom_ref is not None:
            result["baseline_e_mae"] = baseline_mae(test_set.cache, test_set.indices,
                                                    best.atom_ref.detach().cpu().double().numpy())
        if cfg.plots:
            from fastchgnet.train.report import parity_plots

            result["plots"] = [str(p) for p in parity_plots(res, out)]
    result["units"] = {"e_mae": "eV/atom", "f_mae": "eV/A", "s_mae": "GPa", "m_mae": "muB"}
    tmp = out / "test.json.tmp"
    tmp.write_text(json.dumps(_json_safe(result), indent=1) + "\n")
    os.replace(tmp, out / "test.json")
    from fastchgnet.train.report import mae_table

    log(mae_table(result))
    log(f"checkpoint: {out / 'best.pt'}   metrics: {out / 'metrics.csv'}   test: {out / 'test.json'}")
    if result.get("plots"):
        log("parity plots: " + ", ".join(result["plots"]))
    return result
