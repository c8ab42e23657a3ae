"""The whole job behind ``fastchgnet train``: :func:`train`.

Read the data into the graph cache, split it, build (or load) the model, fit the AtomRef, train with
Adam and a cosine schedule (:class:`~fastchgnet.train.loop.Trainer`), validate every epoch, write
checkpoints and ``metrics.csv``, and at the end evaluate the best checkpoint on the test set
(``test.json`` and parity plots).

Run directory (``--out``)::

    config.json     the effective TrainConfig of the run (also a valid --config file)
    split.json      the cache indices of the train / val / test samples
    train.log       the log
    metrics.csv     one row per epoch
    last.pt         model + optimiser + scheduler + epoch/step + RNG (written atomically)
    best.pt         the model with the lowest validation loss (loadable by load_model); without
                    validation data, the model of the last epoch
    run.lock        while a run owns the folder (its pid and host; see train/run_lock.py)
    test.json       MAEs of best.pt on the test set (by default the held-out part of --data),
                    and the per-element linear baseline fitted on the training labels
    tensorboard/    with --tensorboard: the metrics.csv numbers as TensorBoard events
    parity_*.png    parity plots of energy, forces, stress and magnetic moments

Distributed (launched by torchrun or SLURM with more than one process): ``batch_size`` is the
*global* batch, split over the ranks for every step by the load balancer
(:mod:`fastchgnet.train.balance`); the model is wrapped in DDP; rank 0 alone writes the log,
``metrics.csv`` and the checkpoints; validation is sharded over the ranks. The global batches do
not depend on the number of ranks, so a run may be resumed on a different number of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from fastchgnet.data.builtin import builtin_dataset_path, read_builtin
from fastchgnet.data.cache import GraphCache, build_cache, open_or_build
from fastchgnet.data.readers import read_dataset, resolve_dataset_spec
from fastchgnet.device import resolve_device
from fastchgnet.model.exact import CHGNet
from fastchgnet.model.weights import load_model
from fastchgnet.train.config import TrainConfig
from fastchgnet.train.data import GraphDataset, split_indices
from fastchgnet.train.data_checks import check_training_data
from fastchgnet.train.distributed import (
    DistEnv,
    DistributedTrainingError,
    init_distributed,
    rank_ordered,
    shutdown,
)
from fastchgnet.train.evaluation import evaluate
from fastchgnet.train.loop import StepCallback, Trainer
from fastchgnet.train.model_setup import (
    baseline_mae,
    build_model,
    fit_atom_ref,
    freeze,
    model_energies,
    refit_atom_ref,
)
from fastchgnet.train.report import mae_table, open_tensorboard, parity_plots, run_logger, write_json
from fastchgnet.train.resume import RESUMABLE_OPTIONS, resume_config, set_options
from fastchgnet.train.run_lock import RunFolderLockedError, RunLock
from fastchgnet.train.safety import read_checkpoint

__all__ = ["RESUMABLE_OPTIONS", "default_cache_root", "finish", "prepare_data", "train"]

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------------
# data


def default_cache_root() -> Path:
    env = os.environ.get("FASTCHGNET_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fastchgnet" / "graphs"


def prepare_data(path: str | None, *, format: str = "auto", cache_root: str | os.PathLike | None = None,
                 skip_bad: bool = False, atom_cutoff: float = 6.0, bond_cutoff: float = 3.0,
                 workers: int | None = None, log: Log = print) -> GraphCache:
    """The graph cache of a dataset file (``None``: the built-in dataset), built on first use.

    Bad entries stop with an error naming the file and entry, or with ``skip_bad`` are left out
    and counted (the counts are logged and kept in the cache's ``meta.json``).
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    stats: dict[str, Any] = {}
    if path is None:
        source = builtin_dataset_path()

        def samples() -> Iterator[Any]:
            return read_builtin(source, skip_bad=skip_bad, stats=stats)
        fmt = "builtin"
    else:
        source = Path(resolve_dataset_spec(path))  # 'mlearn:Ge[:test]' -> the bundled file
        if not source.is_file():
            raise FileNotFoundError(f"dataset {path} does not exist (or is not a file)")

        def samples() -> Iterator[Any]:
            return read_dataset(source, format=format, skip_bad=skip_bad, stats=stats)  # type: ignore[arg-type]
        fmt = format

    def meta_extra() -> dict[str, Any]:
        return {"source": str(source), "reader": dict(stats)}

    t0 = time.perf_counter()
    cache = _open_or_build(samples, source, root, workers, options={"format": fmt},
                           atom_cutoff=atom_cutoff, bond_cutoff=bond_cutoff, skip_bad=skip_bad,
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


#: a source file up to this size is read ahead to count its samples (:func:`_open_or_build`)
_PEEK_BYTES = 256 << 20


class _NeedsBuild(Exception):
    """Raised by the probe of :func:`_open_or_build` when the cache does not exist yet."""


def _needs_build() -> Iterator[Any]:
    raise _NeedsBuild


def _open_or_build(samples: Callable[[], Iterator[Any]], source: Path, root: Path,
                   workers: int | None, **kw: Any) -> GraphCache:
    """:func:`open_or_build`, building a source that fits in one shard in this process: worker
    processes would get that one shard between them, and starting one (a fresh interpreter that
    imports torch) costs more than building a few hundred graphs (1-3 s on an idle CPU, over 10 s on
    a loaded one). A file of up to :data:`_PEEK_BYTES` whose cache is missing is read ahead by one
    shard's worth of samples to know (the samples read are not read again)."""
    if workers == 1 or source.stat().st_size > _PEEK_BYTES:
        return open_or_build(samples, source, root, workers=workers, **kw)
    try:  # open_or_build calls its samples function only when it has to build
        return open_or_build(_needs_build, source, root, workers=workers, **kw)
    except _NeedsBuild:
        pass
    shard = inspect.signature(build_cache).parameters["shard_size"].default
    it = samples()
    head = list(itertools.islice(it, shard + 1))
    return open_or_build(lambda: itertools.chain(head, it), source, root,
                         workers=1 if len(head) <= shard else workers, **kw)


def _split(config: TrainConfig, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / val / test indices of the first ``n`` samples; a separate ``val_data`` or
    ``test_data`` file gives its share of the split to the training set."""
    fractions = list(config.split)
    if config.val_data is not None:
        fractions[0] += fractions[1]
        fractions[1] = 0.0
    if config.test_data is not None:
        fractions[0] += fractions[2]
        fractions[2] = 0.0
    return split_indices(n, fractions, seed=config.seed)


# ------------------------------------------------------------------------------------------------
# the whole job


def train(config: TrainConfig | None = None, *, log: Log | None = None,
          callbacks: Iterable[StepCallback] = (), given: Iterable[str] | None = None,
          **overrides: Any) -> dict[str, Any]:
    """Run a training job (``fastchgnet train``); returns the test metrics (``test.json``).

    ``train(epochs=3, batch_size=8, out="runs/x")`` or ``train(TrainConfig(...))``. With
    ``resume=True`` the run in ``out`` continues from its ``last.pt`` up to ``epochs``, and writes
    to ``out`` (the folder given, wherever the run was started). The other options come from the
    saved run; one that the caller set to another value is an error naming it, unless it may
    change on resume (:data:`RESUMABLE_OPTIONS`: ``epochs`` extends or shortens the run,
    ``device``, ``workers``, ...). ``given``: the names of the options the caller set (the CLI
    passes its flags); by default the keyword ``overrides``, and for a ``config`` its fields that
    differ from the defaults.

    The run folder is locked while the job runs (``out/run.lock``): a second job on the same
    folder fails at once (:class:`~fastchgnet.train.run_lock.RunFolderLockedError`).

    ``callbacks``: functions ``callback(trainer)`` called after every optimiser step (see
    :class:`~fastchgnet.train.loop.Trainer`). When one calls ``trainer.request_stop()`` the job
    ends after that step, without the end-of-epoch work or the test report, and returns ``{}``.

    Launched by torchrun (or SLURM) with several processes, every process calls this: they join
    one process group (NCCL on CUDA, gloo on the CPU) and train data-parallel; rank 0 returns the
    test metrics, the other ranks ``{}``. A failure on any rank (a rank that died, a collective past
    ``dist_timeout``) raises :class:`DistributedTrainingError` naming the rank and the checkpoint to
    resume from.
    """
    if config is None:
        config = TrainConfig(**overrides)
        chosen = set(overrides)
    else:
        chosen = set_options(config) | set(overrides)
        if overrides:
            config = TrainConfig.from_dict({**config.to_dict(), **overrides})
    if given is not None:
        chosen = set(given)
    out = Path(config.out)
    last = out / "last.pt"
    if config.resume and not last.is_file():  # before the lock creates the folder
        raise FileNotFoundError(f"--resume: no checkpoint {last}")
    env = init_distributed(config.device, config.dist_timeout)
    if env is None:
        with _own_run_folder(out, None, log):
            return _train(_run_config(config, chosen, last), None, log, callbacks)
    try:
        with _own_run_folder(out, env, log):
            result = _train(_run_config(config, chosen, last), env, log, callbacks)
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


def _run_config(config: TrainConfig, given: set[str], last: Path) -> TrainConfig:
    """The config of the run (the saved one on resume, see :func:`resume_config`); a new run in
    a folder that holds one is an error. Called under the run folder's lock."""
    if config.resume:
        saved = read_checkpoint(last)["trainer"]["train_config"]
        return resume_config(config, saved, given, last)
    if last.is_file():
        raise FileExistsError(f"{last.parent} already holds a run (last.pt): pass --resume to "
                              "continue it or choose another --out")
    # the recipe's loss prefactors written out: config.json and the checkpoints hold the values
    # this run trains with, whatever a later version's defaults
    return dataclasses.replace(config, prefactors=config.loss_prefactors)


@contextlib.contextmanager
def _own_run_folder(out: Path, env: DistEnv | None, log: Log | None) -> Iterator[None]:
    """Hold ``out/run.lock`` for the block (rank 0 of a distributed run; every rank learns whether
    it got it, so all fail together)."""
    lock, failure = None, None
    if env is None or env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out, log=run_logger(out, log))
        try:
            lock.acquire()
        except RunFolderLockedError as exc:
            lock, failure = None, exc
    if env is not None:
        flag = torch.tensor([0.0 if failure is None else 1.0], device=env.device)
        env.all_reduce(flag)
        if failure is None and float(flag) > 0:
            if lock is not None:
                lock.release()
            raise RunFolderLockedError(f"run folder {out} is in use by another run (rank 0 could "
                                       "not lock it; its log says by which)")
    if failure is not None:
        raise failure
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _checkpoint_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["trainer"]["step"])
    except Exception:  # absent or unreadable: reported as not written
        return None


def _prepare_run_dir(out: Path, main: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if main:
        for stale in out.glob("*.tmp"):  # partial writes of a killed run (the real files are intact)
            stale.unlink()


def _datasets(config: TrainConfig, model: CHGNet, env: DistEnv | None, log: Log
              ) -> tuple[GraphCache, np.ndarray, np.ndarray, np.ndarray, GraphDataset, GraphDataset,
                         GraphDataset]:
    """The graph cache of ``data``, its split, and the train / val / test datasets."""
    cutoffs = {"atom_cutoff": model.config.atom_graph_cutoff, "bond_cutoff": model.config.bond_graph_cutoff}
    data_kw = dict(format=config.format, cache_root=config.cache, skip_bad=config.skip_bad,
                   workers=config.cache_workers, log=log, **cutoffs)

    def data() -> tuple[GraphCache, GraphCache | None, GraphCache | None]:
        extra = {**data_kw, "format": "auto"}
        return (prepare_data(config.data, **data_kw),
                prepare_data(config.val_data, **extra) if config.val_data is not None else None,
                prepare_data(config.test_data, **extra) if config.test_data is not None else None)

    # distributed: rank 0 builds the graph cache, the others open it (each reads only its samples)
    cache, val_cache, test_cache = rank_ordered(env, data)
    n = len(cache) if config.limit is None else min(config.limit, len(cache))
    tr, va, te = _split(config, n)
    train_set = GraphDataset(cache, tr)
    val_set = GraphDataset(val_cache) if val_cache is not None else GraphDataset(cache, va)
    test_set = GraphDataset(test_cache) if test_cache is not None else GraphDataset(cache, te)
    return cache, tr, va, te, train_set, val_set, test_set


def _set_up_model(model: CHGNet, config: TrainConfig, cache: GraphCache, tr: np.ndarray,
                  main: bool, log: Log, device: torch.device) -> None:
    """Fit the AtomRef (a new run) and freeze the ``config.freeze`` groups. The fit reads the
    whole training set: rank 0 only (DDP broadcasts rank 0's parameters, the AtomRef included,
    when it wraps the model). From scratch the AtomRef is fitted to the labels; fine-tuning
    (``init``) refits it to the residuals of the initial model (``refit_atom_ref``)."""
    if not config.resume and main and model.atom_ref is not None:
        if config.init is None:
            ref, mae = fit_atom_ref(cache, tr, model.config.max_num_elements)
            with torch.no_grad():
                model.atom_ref.copy_(torch.as_tensor(ref, dtype=model.atom_ref.dtype))
            log(f"AtomRef fitted on {len(tr)} training structures: baseline MAE {mae * 1e3:.1f} meV/atom")
        elif config.refit_atom_ref:
            _refit_atom_ref(model, config, cache, tr, log, device)
        else:
            log(f"AtomRef of {config.init} kept (--no-refit-atomref)")
    if config.freeze:
        frozen = freeze(model, config.freeze)
        log(f"frozen: {len(frozen)} parameter tensors ({', '.join(config.freeze)})")


def _refit_atom_ref(model: CHGNet, config: TrainConfig, cache: GraphCache, tr: np.ndarray,
                    log: Log, device: torch.device) -> None:
    """Refit the pretrained AtomRef to the training set: one no-grad pass of the initial model
    gives its energies without AtomRef; the per-element least squares on the residuals gives the
    new references. Logs each changed element, old -> new (eV/atom)."""
    from pymatgen.core import Element  # heavy: only when refitting (keeps `--help` light)

    assert model.atom_ref is not None
    t0 = time.perf_counter()
    dtype = torch.float64 if config.precision == "fp64" else torch.float32
    model.to(device, dtype)
    energies = model_energies(model, GraphDataset(cache, tr),
                              batch_size=config.eval_batch_size or 2 * config.batch_size, device=device)
    old = model.atom_ref.detach().cpu().double().numpy().copy()
    ref, before, after = refit_atom_ref(cache, tr, energies, old, model.config.max_num_elements)
    with torch.no_grad():
        model.atom_ref.copy_(torch.as_tensor(ref, dtype=model.atom_ref.dtype))
    changed = np.flatnonzero(ref != old)
    shifts = ", ".join(f"{Element.from_Z(int(z) + 1).symbol} {old[z]:.4f} -> {ref[z]:.4f}"
                       for z in changed)
    log(f"AtomRef refit to the residuals of {config.init} on {len(tr)} training structures "
        f"({time.perf_counter() - t0:.1f} s), eV/atom: {shifts or 'no element changed'}; "
        f"initial-model energy MAE {before * 1e3:.1f} -> {after * 1e3:.1f} meV/atom")


def _train(config: TrainConfig, env: DistEnv | None, log: Log | None,
           callbacks: Iterable[StepCallback] = ()) -> dict[str, Any]:
    """The job of :func:`train` on this process (``env``: its place in a distributed run)."""
    main = env is None or env.is_main
    out = Path(config.out)
    last = out / "last.pt"
    _prepare_run_dir(out, main)
    _log = run_logger(out, log) if main else (lambda msg: None)
    _log(config.recipe())
    if config.tensorboard and main:
        open_tensorboard(out).close()  # fail before the data and the model when it is missing
    if env is not None:
        _log(f"distributed: {env.world_size} ranks, backend {env.backend}, global batch "
             f"{config.batch_size} (~{config.batch_size / env.world_size:.1f} per rank), "
             f"balance {config.balance}")

    torch.manual_seed(config.seed)
    model = build_model(config)
    cache, tr, va, te, train_set, val_set, test_set = _datasets(config, model, env, _log)
    if main:
        (out / "split.json").write_text(json.dumps({"cache": str(cache.path), "train": tr.tolist(),
                                                    "val": va.tolist(), "test": te.tolist()}))
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    device = env.device if env is not None else torch.device(resolve_device(config.device))
    _set_up_model(model, config, cache, tr, main, _log, device)

    trainer = Trainer(model, config, train_set, val_set, log=log, dist=env, callbacks=callbacks)
    if config.resume:
        trainer.resume_from(last)
        _log(f"resumed {last}: epoch {trainer.epoch}, step {trainer.step} "
             f"({trainer.step_in_epoch} steps into the epoch)")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _log(f"model {config.model}: {n_train:,} trainable parameters; {len(train_set)} train / "
         f"{len(val_set)} val / {len(test_set)} test structures; batch {config.batch_size}, "
         f"lr {config.learning_rate:.3g}, {trainer.steps_per_epoch} steps/epoch, {config.epochs} epochs, "
         f"{trainer.device}, {config.precision}")
    checks = check_training_data(train_set, val_set, test_set, _largest_weights(config), _log) \
        if main else {}
    trainer.fit()
    if env is not None:
        env.barrier()  # every rank done and the last checkpoint written
    if trainer.stopped or not main:
        return {}
    return finish(trainer, cache, test_set, tr, log=_log, checks=checks)


def _largest_weights(config: TrainConfig) -> dict[str, float]:
    """Each label's largest loss prefactor over the run's stages."""
    stages = [config.stage_prefactors(0)]
    if config.stage_two_start is not None:
        stages.append(config.stage_prefactors(config.stage_two_start))
    return {k: max(float(p.get(k, 0.0)) for p in stages) for k in "efsm"}


def finish(trainer: Trainer, cache: GraphCache, test_set: GraphDataset, train_indices: np.ndarray,
           *, log: Log = print, checks: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate best.pt on the test set; write test.json (with how best.pt was chosen and the
    data checks) and the parity plots."""
    out = trainer.out
    cfg = trainer.cfg
    best = load_model(out / "best.pt", device=trainer.device)
    result: dict[str, Any] = {"checkpoint": str(out / "best.pt"), "n_test": len(test_set),
                              "test_set": _test_set_label(cfg), "best": _best_selection(out / "best.pt")}
    if result["best"].get("note"):
        log(result["best"]["note"])
    if checks:
        result["data_checks"] = checks
    if len(test_set):
        res = evaluate(best, test_set, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                       device=trainer.device, loss_fn=trainer.loss_fn, collect=True)
        result.update({k: res[k] for k in ("loss", "e_mae", "f_mae", "s_mae", "m_mae")})
        if best.atom_ref is not None:  # a per-element linear fit of the training labels
            ref, _ = fit_atom_ref(cache, train_indices, best.config.max_num_elements)
            result["baseline_e_mae"] = baseline_mae(test_set.cache, test_set.indices, ref)
        if cfg.plots:
            result["plots"] = [str(p) for p in parity_plots(res, out)]
    result["units"] = {"e_mae": "eV/atom", "f_mae": "eV/A", "s_mae": "GPa", "m_mae": "muB"}
    write_json(out / "test.json", result)
    log(mae_table(result))
    log(f"checkpoint: {out / 'best.pt'}   metrics: {out / 'metrics.csv'}   test: {out / 'test.json'}")
    if result.get("plots"):
        log("parity plots: " + ", ".join(result["plots"]))
    return result


def _test_set_label(cfg: TrainConfig) -> str:
    """What the set that test.json reports on is."""
    if cfg.test_data is not None:
        return f"--test-data {cfg.test_data}"
    return (f"held-out {cfg.split[2] * 100:g} % of --data (random split, not a separate test set; "
            "evaluate on your own test file with fastchgnet evaluate)")


def _best_selection(path: Path) -> dict[str, Any]:
    """How best.pt was chosen (its epoch; ``selected_by`` ``val_loss`` or ``last_epoch``)."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    how = ck.get("selected_by", "val_loss")
    sel: dict[str, Any] = {"epoch": ck.get("epoch"), "selected_by": how}
    if how == "last_epoch":
        sel["note"] = (f"no validation set: best.pt = last epoch (epoch {ck.get('epoch')}), not "
                       "selected by a validation loss")
    return sel
