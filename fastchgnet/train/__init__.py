"""Training: datasets and prefetch, loss and metrics, optimizer and schedule, the trainer.

``fastchgnet.train.train(...)`` (or ``fastchgnet train`` on the command line) runs a whole job;
under ``torchrun`` it trains data-parallel (:mod:`fastchgnet.train.distributed`,
:mod:`fastchgnet.train.balance`).
"""

from fastchgnet.train.loss import (
    DEFAULT_PREFACTORS,
    EFSMLoss,
    MAEAccumulator,
    Targets,
    collate_targets,
)
from fastchgnet.train.schedule import WarmupCosine, default_lr, make_optimizer, make_scheduler
from fastchgnet.train.data import Collator, DevicePrefetcher, EpochBatchSampler, GraphDataset, split_indices
from fastchgnet.train.balance import DistributedBatchSampler, load_cv, partition, sample_costs
from fastchgnet.train.distributed import DistEnv, DistributedTrainingError, init_distributed
from fastchgnet.train.trainer import TrainConfig, Trainer, evaluate, fit_atom_ref, freeze, prepare_data, train

__all__ = [
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
    "TrainConfig",
    "Trainer",
    "evaluate",
    "fit_atom_ref",
    "freeze",
    "prepare_data",
    "split_indices",
    "train",
    "DEFAULT_PREFACTORS",
    "EFSMLoss",
    "MAEAccumulator",
    "Targets",
    "WarmupCosine",
    "collate_targets",
    "default_lr",
    "make_optimizer",
    "make_scheduler",
]
