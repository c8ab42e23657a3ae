"""Kept for compatibility; import from :mod:`fastchgnet.train`.

The former single-module trainer, now split by concern: :mod:`~fastchgnet.train.config`
(``TrainConfig``), :mod:`~fastchgnet.train.job` (``train``, ``prepare_data``, ``finish``),
:mod:`~fastchgnet.train.model_setup` (``build_model``, ``fit_atom_ref``, ``freeze``),
:mod:`~fastchgnet.train.loop` (``Trainer``), :mod:`~fastchgnet.train.evaluation` (``evaluate``),
:mod:`~fastchgnet.train.runtime` (precision, RNG state, DDP) and :mod:`~fastchgnet.train.report`
(metrics, run log, test report). Nothing in the library imports this module.
"""

from __future__ import annotations

from fastchgnet.train.config import PRECISIONS, TrainConfig
from fastchgnet.train.evaluation import evaluate
from fastchgnet.train.job import default_cache_root, finish, prepare_data, train
from fastchgnet.train.loop import STATE_VERSION, StepCallback, Trainer
from fastchgnet.train.model_setup import baseline_mae, build_model, fit_atom_ref, freeze, parameter_groups
from fastchgnet.train.report import METRIC_COLUMNS, read_metrics, run_logger
from fastchgnet.train.report import json_safe as _json_safe
from fastchgnet.train.runtime import precision_context

__all__ = ["METRIC_COLUMNS", "PRECISIONS", "STATE_VERSION", "StepCallback", "TrainConfig", "Trainer",
           "baseline_mae", "build_model", "default_cache_root", "evaluate", "finish", "fit_atom_ref",
           "freeze", "parameter_groups", "precision_context", "prepare_data", "read_metrics",
           "run_logger", "train"]
