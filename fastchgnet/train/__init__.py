"""Training: datasets and prefetch, loss and metrics, optimizer and schedule, the trainer.

``fastchgnet.train.train(...)`` (or ``fastchgnet train`` on the command line) runs a whole job;
under ``torchrun`` it trains data-parallel (:mod:`fastchgnet.train.distributed`,
:mod:`fastchgnet.train.balance`).

Modules: ``config`` (TrainConfig), ``job`` (train, prepare_data), ``model_setup`` (build_model,
fit_atom_ref, freeze), ``loop`` (Trainer and its step callbacks), ``evaluation`` (evaluate),
``runtime`` (precision, RNG state, DDP), ``report`` (metrics.csv, train.log, test.json, plots),
``resume`` (the options of a resumed run), ``run_lock`` (one run per folder), ``safety``
(divergence, checkpoint writes and reads), ``data_checks`` (labels, stress units, overlap).
"""

from fastchgnet.train.loss import (
    DEFAULT_PREFACTORS,
    EFSMLoss,
    MAEAccumulator,
    Targets,
    collate_targets,
)
from fastchgnet.train.schedule import FINETUNE_LR, WarmupCosine, default_lr, make_optimizer, make_scheduler
from fastchgnet.train.data import Collator, DevicePrefetcher, EpochBatchSampler, GraphDataset, split_indices
from fastchgnet.train.balance import DistributedBatchSampler, load_cv, partition, sample_costs
from fastchgnet.train.distributed import DistEnv, DistributedTrainingError, init_distributed
from fastchgnet.train.config import TrainConfig
from fastchgnet.train.evaluation import evaluate
from fastchgnet.train.loop import StepCallback, Trainer
from fastchgnet.train.model_setup import build_model, fit_atom_ref, freeze
from fastchgnet.train.job import prepare_data, train
from fastchgnet.train.report import read_metrics
from fastchgnet.train.run_lock import RunFolderLockedError
from fastchgnet.train.safety import CheckpointWriteError, TrainingDivergedError, UnreadableCheckpointError

__all__ = [
    "CheckpointWriteError",
    "RunFolderLockedError",
    "TrainingDivergedError",
    "UnreadableCheckpointError",
    "Collator",
    "DistEnv",
    "DistributedBatchSampler",
    "DistributedTrainingError",
    "init_distributed",
    "load_cv",
    "partition",
    "sample_costs",
    "DevicePrefetcher",
    "EpochBatchSampler",
    "GraphDataset",
    "StepCallback",
    "TrainConfig",
    "Trainer",
    "build_model",
    "evaluate",
    "fit_atom_ref",
    "freeze",
    "prepare_data",
    "read_metrics",
    "split_indices",
    "train",
    "DEFAULT_PREFACTORS",
    "EFSMLoss",
    "MAEAccumulator",
    "Targets",
    "WarmupCosine",
    "collate_targets",
    "FINETUNE_LR",
    "default_lr",
    "make_optimizer",
    "make_scheduler",
]
