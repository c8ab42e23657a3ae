"""Training utilities: labels, loss, metrics, optimizer and learning-rate schedule."""

from fastchgnet.train.loss import (
    DEFAULT_PREFACTORS,
    EFSMLoss,
    MAEAccumulator,
    Targets,
    collate_targets,
)
from fastchgnet.train.schedule import WarmupCosine, default_lr, make_optimizer, make_scheduler

__all__ = [
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
