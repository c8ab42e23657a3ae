"""The training loop: :class:`Trainer` (steps, epochs, validation, stage two, the moving average,
checkpoints and their exact resume) and its step callbacks.

Checkpoints are written at the end of every epoch (and every ``checkpoint_every`` steps when set)
with a temporary file and a rename, so a run killed at any moment resumes from an intact file.
A checkpoint is never written from a diverged state (non-finite weights, a non-finite loss or one
grown past :data:`~fastchgnet.train.safety.DIVERGENCE_FACTOR` times the best epoch's): the run
stops with :class:`~fastchgnet.train.safety.TrainingDivergedError` and the files keep their last
good state. Without validation data, ``best.pt`` is the model of the last epoch.
Batches depend only on ``(seed, epoch)``: a resumed trainer continues exactly where the checkpoint
was written, even in the middle of an epoch.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fastchgnet.device import flush_denormals, resolve_device
from fastchgnet.compile import check_first_order
from fastchgnet.compile.memory import step_key
from fastchgnet.compile.train import TrainForward, resolve_train_compile
from fastchgnet.model.exact import CHGNet
from fastchgnet.model.weights import save_checkpoint
from fastchgnet.train.balance import DistributedBatchSampler, sample_costs
from fastchgnet.train.config import TrainConfig
from fastchgnet.train.data import Collator, DevicePrefetcher, EpochBatchSampler, GraphDataset
from fastchgnet.train.distributed import DistEnv, global_loss
from fastchgnet.train.ema import EMA
from fastchgnet.train.evaluation import evaluate
from fastchgnet.train.loss import EFSMLoss
from fastchgnet.train.report import open_tensorboard, run_logger, write_metrics
from fastchgnet.train.runtime import precision_context, rng_state, set_rng_state, wrap_ddp
from fastchgnet.train.safety import (
    DIVERGENCE_FACTOR,
    TrainingDivergedError,
    checkpoint_summary,
    count_nonfinite,
    read_checkpoint,
    write_checkpoint,
)
from fastchgnet.train.schedule import make_optimizer, make_scheduler

__all__ = ["STATE_VERSION", "StepCallback", "Trainer"]

STATE_VERSION = 1

#: called with the trainer after every optimiser step (see :class:`Trainer`)
StepCallback = Callable[["Trainer"], None]


class Trainer:
    """Trains ``model`` on ``train_set``, validating on ``val_set`` every epoch.

    Use :func:`~fastchgnet.train.train` for the whole job from a :class:`TrainConfig`; use
    ``Trainer`` directly from Python with your own model and datasets::

        trainer = Trainer(model, TrainConfig(epochs=5, batch_size=8, out="runs/x"), train_ds, val_ds)
        history = trainer.fit()

    With ``dist`` (from :func:`~fastchgnet.train.distributed.init_distributed`; every rank builds
    its Trainer the same way) the model is wrapped in DDP and each rank trains on its balanced
    share of every global batch of ``config.batch_size`` structures.

    ``callbacks``: functions ``callback(trainer)`` called, in order, after every optimiser step
    (its bookkeeping, logging and any ``checkpoint_every`` checkpoint done; ``trainer.step`` is the
    number of steps taken). A callback may read the trainer's state, save it
    (``trainer.save(trainer.out / "last.pt")``) or call :meth:`request_stop`. In a distributed run
    the callbacks run on every rank; one that stops must stop every rank at the same step.
    """

    def __init__(self, model: CHGNet, config: TrainConfig, train_set: GraphDataset,
                 val_set: GraphDataset | None = None, *, log: Callable[[str], None] | None = None,
                 dist: DistEnv | None = None, callbacks: Iterable[StepCallback] = ()) -> None:
        self.cfg = config
        self.dist = dist
        self.is_main = dist is None or dist.is_main
        self.device = dist.device if dist is not None else torch.device(resolve_device(config.device))
        self.dtype = torch.float64 if config.precision == "fp64" else torch.float32
        self.collator = Collator(self.dtype)
        self.model = model.to(self.device, self.dtype)
        self.train_set, self.val_set = train_set, val_set
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = run_logger(self.out, log) if self.is_main else (lambda msg: None)
        self.callbacks: list[StepCallback] = list(callbacks)
        self.stopped = False  # the last fit() returned at a stop request, not at the last epoch
        self.early_stopped = False  # the last fit() ended early: `patience` epochs without progress
        self.bad_epochs = 0  # epochs since the validation loss last improved
        self._stop_requested = False
        self.loss_fn = EFSMLoss(**config.loss_prefactors, delta=config.delta, loss=config.loss)
        self.sampler: EpochBatchSampler | DistributedBatchSampler
        self.ddp: nn.Module | None = None
        if dist is None:
            self.sampler = EpochBatchSampler(len(train_set), config.batch_size, shuffle=True,
                                             seed=config.seed, no_single=True)
        else:
            # costs of every training sample (3 numbers each, from the cache's pointers): each rank
            # partitions every global batch the same way without communicating
            self.sampler = DistributedBatchSampler(
                sample_costs(train_set.sizes()), config.batch_size, dist.world_size, dist.rank,
                policy=config.balance, seed=config.seed)
            self.ddp = wrap_ddp(self.model, config.bucket_mb)
        eager = self.ddp if self.ddp is not None else self.model
        policy = resolve_train_compile(config.compile)
        if policy not in (None, "auto") and self.ddp is not None:
            # one process: models with autograd forces compile too (their gradient is traced)
            check_first_order(self.model, "--compile of a distributed run")
        # distributed: the DDP module is compiled (dynamo splits the graph at the gradient
        # buckets, so the all-reduce still overlaps the backward): no fullgraph
        self._forward = TrainForward(eager, policy, device=self.device,
                                     can_auto=self.ddp is None and self.device.type == "cpu",
                                     fullgraph=self.ddp is None, log=self.log,
                                     memory_key=step_key(self.model, ddp=self.ddp is not None))
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
        # the lowest epoch-mean training loss (of the current stage) and its epoch: the divergence
        # rule compares with it
        self.best_train = math.inf
        self.best_train_epoch = 0
        self._epoch_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self._epoch_count = 0
        self._epoch_time = 0.0
        workers = config.workers if config.workers is not None else (4 if self.device.type == "cuda" else 0)
        self.workers = workers
        self._train_loader: torch.utils.data.DataLoader | None = None
        self.has_val = val_set is not None and len(val_set) > 0
        if config.patience is not None and not self.has_val:
            self.log(f"WARNING: --patience {config.patience} ignored: no validation set to watch")
        self._tb = open_tensorboard(self.out) if config.tensorboard and self.is_main else None
        if not self.has_val:
            self.log("WARNING: no validation set (0 validation structures): best.pt will be the "
                     "model of the last epoch, not the one with the lowest validation loss, and "
                     "test.json reports that model. Give a validation fraction in --split or "
                     "--val-data to select best.pt by the validation loss.")

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"state_version": STATE_VERSION, "epoch": self.epoch, "step": self.step,
                "step_in_epoch": self.step_in_epoch, "best_val": self.best_val,
                "best_train": self.best_train, "best_train_epoch": self.best_train_epoch,
                "bad_epochs": self.bad_epochs, "epoch_loss": self._epoch_loss.detach().cpu(), "epoch_count": self._epoch_count,
                "epoch_time": self._epoch_time, "steps_per_epoch": self.steps_per_epoch,
                "world_size": self.dist.world_size if self.dist is not None else 1,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(self.device), "train_config": self.cfg.to_dict(),
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
        self.best_train = float(state.get("best_train", math.inf))
        self.best_train_epoch = int(state.get("best_train_epoch", 0))
        self.bad_epochs = int(state.get("bad_epochs", 0))
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
        set_rng_state(state.get("rng", {}), self.device)
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError("the trainer state has no EMA weights (the run was saved without "
                                 "ema_decay); resume it with the same ema_decay")
            self.ema.load_state_dict(state["ema"])

    def save(self, path: Path, **extra: Any) -> Path:
        """Model checkpoint (loadable by :func:`load_model`) plus the trainer state, atomically.
        Distributed: every rank calls it (the running loss is summed over the ranks), rank 0
        alone writes.

        Refuses (:class:`TrainingDivergedError`, nothing written) when the weights, the moving
        average or the epoch's running loss are not finite, or the running loss diverged; a
        failed write raises :class:`~fastchgnet.train.safety.CheckpointWriteError` (the previous
        file is intact)."""
        total = self._sync_epoch_loss()
        running = float(total) / max(self._epoch_count, 1)
        self._check_loss(running, "the running training loss of the epoch so far")
        self._check_weights()
        if self.is_main:
            write_checkpoint(lambda: save_checkpoint(self.model, path, trainer=self.state_dict(),
                                                     **extra), path)
        return path

    def _check_loss(self, loss: float, what: str) -> None:
        """Raise :class:`TrainingDivergedError` when ``loss`` is not finite or exceeds
        DIVERGENCE_FACTOR times the best epoch loss."""
        if not math.isfinite(loss):
            raise self._diverged(f"{what} is {loss}")
        if math.isfinite(self.best_train) and loss > DIVERGENCE_FACTOR * self.best_train:
            raise self._diverged(
                f"{what} is {loss:.4g}, more than {DIVERGENCE_FACTOR:g} x the best epoch's "
                f"{self.best_train:.4g} (epoch {self.best_train_epoch}): the training diverged")

    def _check_weights(self) -> None:
        tensors = list(self.model.state_dict().values())
        if self.ema is not None:
            tensors += list(self.ema.shadow)
        bad, total = count_nonfinite(tensors)
        if bad:
            raise self._diverged(f"{bad:,} of {total:,} weights are not finite (NaN or inf)")

    def _diverged(self, what: str) -> TrainingDivergedError:
        """The error of a diverged state: where, what, and what the files on disk still hold."""
        last, best = self.out / "last.pt", self.out / "best.pt"
        epoch = self.epoch + 1 if self.step_in_epoch else max(self.epoch, 1)  # the epoch it ran in
        return TrainingDivergedError(
            f"epoch {epoch}, step {self.step}: {what}. Training stopped and nothing was "
            f"saved from this state: {checkpoint_summary(last)}; {checkpoint_summary(best)}. "
            "Resuming would repeat the same steps: start a new run with a lower learning rate "
            "(--lr) or --grad-clip (--init <run>/best.pt keeps the progress).")

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
        ckpt = read_checkpoint(Path(path))  # a clear error for a truncated or foreign file
        self.model.load_state_dict(ckpt["state_dict"])
        self.model.to(self.device, self.dtype)
        self.load_state_dict(ckpt["trainer"])

    # -- steps ---------------------------------------------------------------------------------
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
        t0 = time.perf_counter()
        compiled = self._forward.compiled
        with flush_denormals(self.device):
            try:
                share = self._loss_backward(batch, targets)
            except Exception as exc:  # a compiled step that fails runs again eagerly
                if not compiled:
                    raise
                self._forward.failed(exc)
                compiled = None  # this step's time is not a compiled step's
                share = self._loss_backward(batch, targets)
        if self.cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        if compiled is not None:  # CPU wall time (the "auto" policy runs on the CPU only)
            left = self.cfg.epochs * self.steps_per_epoch - self.step - 1
            work = batch.num_atoms + 2 * batch.num_bonds + batch.num_angles  # as the balancer
            self._forward.step_done(time.perf_counter() - t0, work, compiled, remaining_steps=left)
        return share.detach()

    def _loss_backward(self, batch: Any, targets: Any) -> Tensor:
        """Forward, loss and backward of one step; returns this rank's share of the loss."""
        pred = self._forward(batch, task="efsm", create_graph=True)
        if self.dist is None:
            loss, _ = self.loss_fn(pred, targets)
            share = loss
        else:
            loss, share = global_loss(self.loss_fn, pred, targets, self.dist)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return share

    def request_stop(self) -> None:
        """Make :meth:`fit` return after the current optimiser step (from a step callback, or a
        signal handler on preemption): no end-of-epoch validation or checkpoint, ``stopped`` set.
        Nothing is saved: save first (``trainer.save(trainer.out / "last.pt")``) to resume from
        this step; with ``checkpoint_every`` the last such checkpoint is the resume point."""
        self._stop_requested = True

    # -- validation ----------------------------------------------------------------------------
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

    # -- epochs --------------------------------------------------------------------------------
    def fit(self) -> list[dict[str, Any]]:
        """Train up to ``config.epochs`` epochs (from the current state); returns the metric rows
        of the epochs run now. Returns early, with ``stopped`` set, when a callback called
        :meth:`request_stop`."""
        rows: list[dict[str, Any]] = []
        self.stopped = self.early_stopped = False
        try:
            with precision_context(self.cfg.precision, self.device):
                while self.epoch < self.cfg.epochs:
                    if not self._run_epoch():
                        self.stopped = True
                        break
                    rows.append(self._end_epoch())
                    if self._patience_ran_out():
                        break
        finally:
            if self._tb is not None:
                self._tb.flush()
        return rows

    def _patience_ran_out(self) -> bool:
        """Early stopping: ``patience`` epochs in a row without a lower validation loss."""
        p = self.cfg.patience
        if p is None or not self.has_val or self.bad_epochs < p or self.epoch >= self.cfg.epochs:
            return False
        self.early_stopped = True
        self.log(f"early stop after epoch {self.epoch}: no lower validation loss for {p} epochs "
                 f"(--patience {p}); best.pt holds the best model (val loss {self.best_val:.4f})")
        return True

    def _run_epoch(self) -> bool:
        """The steps of the current epoch from ``step_in_epoch`` on; False when a stop was
        requested (the epoch is left unfinished)."""
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
        try:
            for batch, targets, _ in DevicePrefetcher(self._loader(), self.device, self.dtype):
                loss = self.train_step(batch, targets)
                n = batch.num_graphs if n_global is None else int(n_global[self.step_in_epoch])
                cv = 0.0 if dist_sampler is None else dist_sampler.cv(self.step_in_epoch)
                self._epoch_loss += loss.double() * n
                self._epoch_count += n
                self.step += 1
                self.step_in_epoch += 1
                bar.update(1)
                self._report_step(bar, loss, cv)
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 \
                        and self.step_in_epoch < self.steps_per_epoch:
                    self._epoch_time += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.save(self.out / "last.pt")
                for callback in self.callbacks:
                    callback(self)
                if self._stop_requested:
                    self._stop_requested = False
                    return False
        finally:
            bar.close()
        self._epoch_time += time.perf_counter() - t0
        return True

    def _report_step(self, bar: Any, loss: Tensor, cv: float) -> None:
        """Progress bar and ``log_every`` line of a step. Distributed: rank 0's share times the
        number of ranks estimates the loss without a collective (the exact epoch loss is reduced
        at the epoch's end)."""
        scale = 1 if self.dist is None else self.dist.world_size
        if self.cfg.progress and self.is_main and (self.step_in_epoch % 10 == 0):
            running = scale * float(self._epoch_loss) / max(self._epoch_count, 1)
            bar.set_postfix(loss=f"{running:.4f}", load_cv=f"{cv:.3f}")
        if self.cfg.log_every and self.step % self.cfg.log_every == 0:
            what = "loss" if self.dist is None else "loss (rank 0 share x ranks)"
            self.log(f"step {self.step}  {what} {scale * float(loss):.4f}  load_cv {cv:.4f}")

    def _set_stage(self, epoch: int, starting: bool) -> None:
        """Loss prefactors of the epoch after ``epoch`` completed ones. At the first step of stage
        two the best validation loss is forgotten: it was measured with other prefactors, so
        best.pt is the best model of stage two."""
        self.loss_fn.prefactors.update(self.cfg.stage_prefactors(epoch))
        if starting and epoch == self.cfg.stage_two_start:
            self.best_val = math.inf
            self.bad_epochs = 0
            self.best_train, self.best_train_epoch = math.inf, 0  # the loss changes its scale
            w = ", ".join(f"{k}={v:g}" for k, v in self.loss_fn.prefactors.items())
            lr = (f", constant lr {self.cfg.stage_two_lr:.2e}" if self.cfg.stage_two_lr is not None
                  else "")
            self.log(f"stage two from epoch {epoch + 1}: prefactors {w}{lr}")

    def _end_epoch(self) -> dict[str, Any]:
        """Validate, write the metrics row, last.pt and (when improved) best.pt; log the epoch."""
        train_loss = float(self._sync_epoch_loss()) / max(self._epoch_count, 1)
        load = (float(self.sampler.step_cv().mean())
                if isinstance(self.sampler, DistributedBatchSampler) else 0.0)
        self._check_loss(train_loss, "the epoch's mean training loss")
        self._check_weights()  # before anything of this epoch is written
        val = self.validate()
        self.epoch += 1
        self.step_in_epoch = 0
        row = {"epoch": self.epoch, "step": self.step, "time_s": self._epoch_time,
               "lr": self.optimizer.param_groups[0]["lr"], "train_loss": train_loss,
               "val_loss": val["loss"], "val_e_mae": val["e_mae"], "val_f_mae": val["f_mae"],
               "val_s_mae": val["s_mae"], "val_m_mae": val["m_mae"],
               "structures_per_s": self._epoch_count / max(self._epoch_time, 1e-9), "load_cv": load}
        if self.is_main:
            write_metrics(self.out / "metrics.csv", row)
        if self.has_val:
            improved = math.isfinite(val["loss"]) and val["loss"] < self.best_val
        else:  # nothing to select by: best.pt is the last epoch's model
            improved = True
        if improved:
            self.best_val = val["loss"]
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("epoch",) and math.isfinite(value):
                    self._tb.add_scalar(key, value, self.epoch)
        if train_loss < self.best_train:
            self.best_train, self.best_train_epoch = train_loss, self.epoch
        self.save(self.out / "last.pt")  # checks the weights (and the average) first
        best = self.out / "best.pt"
        if self.is_main and (improved or not best.exists()):
            how = "val_loss" if self.has_val else "last_epoch"
            with self.averaged():
                write_checkpoint(lambda: save_checkpoint(
                    self.model, best, epoch=self.epoch, val=val, selected_by=how,
                    **({"ema_decay": self.ema.decay} if self.ema is not None else {})), best)
        self.log(f"epoch {self.epoch:>3}/{self.cfg.epochs}  {row['time_s']:7.1f} s  lr {row['lr']:.2e}  "
                 f"train {train_loss:.4f}  val {val['loss']:.4f}  MAE e {_fmt(val['e_mae'] * 1e3)} meV/atom  "
                 f"f {_fmt(val['f_mae'] * 1e3)} meV/A  s {_fmt(val['s_mae'])} GPa  m {_fmt(val['m_mae'])} muB"
                 + (f"  load_cv {load:.3f}" if self.dist is not None else "") + ("  *" if improved else ""))
        return row


def _fmt(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:.3g}"
