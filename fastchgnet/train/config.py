"""The options of a training run: :class:`TrainConfig` (the ``fastchgnet train`` flags) and their
checks."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from fastchgnet.model.weights import MODEL_TYPES
from fastchgnet.train.balance import POLICIES
from fastchgnet.train.distributed import DEFAULT_TIMEOUT_S
from fastchgnet.train.loss import DEFAULT_PREFACTORS, FINETUNE_PREFACTORS
from fastchgnet.train.schedule import FINETUNE_LR, default_lr

__all__ = ["PRECISIONS", "TrainConfig"]

PRECISIONS = ("fp32", "fp64", "tf32")


def _positive(name: str, value: float | None) -> None:
    """``value`` is None (unset) or > 0 (NaN fails)."""
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _known_prefactors(what: str, prefactors: Mapping[str, float]) -> None:
    unknown = set(prefactors) - set(DEFAULT_PREFACTORS)
    if unknown:
        raise ValueError(f"unknown {what} {sorted(unknown)}; use e, f, s, m")


@dataclass
class TrainConfig:
    """Everything that defines a training run (the ``fastchgnet train`` options).

    ``batch_size`` is the number of structures per optimiser step: the *global* batch, summed over
    all ranks of a distributed run (on one device, simply the batch). ``lr=None`` takes the
    paper's rule ``batch_size / 128 * 3e-4`` on that global batch when training from scratch, and
    the fine-tuning rate :data:`~fastchgnet.train.schedule.FINETUNE_LR` (1e-3, chgnet's Trainer
    default) with ``init`` (see :meth:`recipe`). ``prefactors=None`` takes the recipe's loss
    prefactors: :data:`~fastchgnet.train.loss.FINETUNE_PREFACTORS` (forces weighted 3) with
    ``init``, :data:`~fastchgnet.train.loss.DEFAULT_PREFACTORS` from scratch; a partial dict
    overrides those it names (:attr:`loss_prefactors`). With ``init``, ``refit_atom_ref``
    (default) refits the AtomRef to the residuals of the initial model by least squares.
    ``data=None`` trains on the built-in dataset. ``val_data`` / ``test_data`` replace the random split's validation / test parts.
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
    refit_atom_ref: bool = True  # with init: refit the AtomRef to the initial model's residuals
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
    prefactors: dict[str, float] | None = None  # None: the recipe's (see loss_prefactors)
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
    # the training forward's torch.compile: "auto" (compile after COMPILE_AFTER_S s of eager steps
    # on one CPU process), a backend ("inductor", ...: from the first step) or "off"/None
    compile: str | None = "auto"
    # distributed runs only (ignored by a single process)
    balance: str = "greedy"  # split of each global batch over the ranks: none, paper, greedy
    bucket_mb: float | None = None  # DDP gradient bucket size (None: torch's 1 MiB first, then 25)
    dist_timeout: float = DEFAULT_TIMEOUT_S  # seconds any collective may wait before failing
    log_every: int = 0  # log loss and load CV every N steps (0: only per epoch)
    patience: int | None = None  # stop after this many epochs without a lower validation loss
    tensorboard: bool = False  # also write the epoch metrics as TensorBoard events (out/tensorboard)

    def __post_init__(self) -> None:
        self.split = tuple(float(x) for x in self.split)  # type: ignore[assignment]
        self.freeze = tuple(self.freeze)
        self._check_choices()
        self._check_optimisation()
        self._check_model_source()
        self._check_distributed()
        if self.prefactors is not None:
            self.prefactors = {k: float(v) for k, v in self.prefactors.items()}
            _known_prefactors("loss prefactors", self.prefactors)
        self._check_stage_two()

    # -- checks (each raises ValueError with the option's name) --------------------------------
    def _check_choices(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: use one of {PRECISIONS}")
        if self.model not in MODEL_TYPES:
            raise ValueError(f"unknown model {self.model!r}; known: {sorted(MODEL_TYPES)}")
        if self.balance not in POLICIES:
            raise ValueError(f"unknown balance policy {self.balance!r}; use one of {POLICIES}")

    def _check_optimisation(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch size must be >= 1 (got {self.epochs}, {self.batch_size})")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        _positive("grad_clip", self.grad_clip)
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 epoch, got {self.patience}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")

    def _check_model_source(self) -> None:
        if self.init is not None and self.model_config:
            raise ValueError("model_config overrides cannot be combined with init (the checkpoint "
                             "defines the architecture)")

    def _check_distributed(self) -> None:
        _positive("bucket_mb", self.bucket_mb)
        _positive("dist_timeout", self.dist_timeout)

    def _check_stage_two(self) -> None:
        if self.stage_two_start is None:
            if self.stage_two_prefactors is not None or self.stage_two_lr is not None:
                raise ValueError("stage_two_prefactors and stage_two_lr need stage_two_start (the "
                                 "number of epochs before stage two)")
            return
        if not 0 <= self.stage_two_start < self.epochs:
            raise ValueError(f"stage_two_start must be in [0, epochs={self.epochs}), "
                             f"got {self.stage_two_start}")
        two = self.stage_two_prefactors or {}
        _known_prefactors("stage-two loss prefactors", two)
        for k, w in two.items():
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"stage-two prefactor {k!r} must be finite and non-negative, "
                                 f"got {w}")
        _positive("stage_two_lr", self.stage_two_lr)

    # -- derived values ------------------------------------------------------------------------
    @property
    def fine_tuning(self) -> bool:
        """Whether the run starts from given weights (``init``)."""
        return self.init is not None

    @property
    def learning_rate(self) -> float:
        """``lr``, else the recipe's: FINETUNE_LR with ``init``, Eq. 14 from scratch."""
        if self.lr is not None:
            return self.lr
        return FINETUNE_LR if self.fine_tuning else default_lr(self.batch_size)

    @property
    def loss_prefactors(self) -> dict[str, float]:
        """The loss prefactors of stage one: the recipe's (fine-tune or from scratch), updated
        with those ``prefactors`` gives."""
        base = FINETUNE_PREFACTORS if self.fine_tuning else DEFAULT_PREFACTORS
        return {**base, **(self.prefactors or {})}

    def _loss_text(self) -> str:
        pref = ", ".join(f"{k}={v:g}" for k, v in self.loss_prefactors.items())
        base = FINETUNE_PREFACTORS if self.fine_tuning else DEFAULT_PREFACTORS
        if self.loss_prefactors != base:
            why = "--weights"
        elif self.fine_tuning:
            why = "the fine-tuning default: forces weighted 3, measured on mlearn"
        else:
            why = "the FastCHGNet / CHGNet default"
        return f"{self.loss} loss prefactors {pref} ({why})"

    def recipe(self) -> str:
        """One line naming the optimisation recipe in force and why (the first line of the log)."""
        sched = f"cosine to {self.min_lr_ratio:g} x lr" + (
            f" after {self.warmup_steps} warm-up steps" if self.warmup_steps else ", no warm-up")
        loss = self._loss_text()
        if self.fine_tuning:
            lr = (f"lr {self.lr:.3g} (--lr)" if self.lr is not None
                  else f"lr {FINETUNE_LR:g} (chgnet's Trainer default for fine-tuning)")
            ref = ("AtomRef refit to the initial model's residuals" if self.refit_atom_ref
                   else "AtomRef kept (--no-refit-atomref)")
            return f"recipe: fine-tune from {self.init}: {lr}, {sched}, {loss}, {ref}"
        lr = (f"lr {self.lr:.3g} (--lr)" if self.lr is not None else
              f"Eq. 14 lr = {self.batch_size}/128 x 3e-4 = {default_lr(self.batch_size):.3g}")
        return (f"recipe: from scratch: {lr}, {sched}, {loss}, AtomRef by least squares on the "
                "labels")

    def stage_prefactors(self, epoch: int) -> dict[str, float]:
        """The loss prefactors of the epoch after ``epoch`` completed ones."""
        pref = self.loss_prefactors
        if self.stage_two_start is not None and epoch >= self.stage_two_start:
            pref.update(self.stage_two_prefactors or {})
        return pref

    # -- (de)serialisation (config.json, the checkpoint's train_config) ------------------------
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
