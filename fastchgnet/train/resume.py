"""The options of a resumed run: which may change, which must match the checkpoint.

On ``--resume`` the run folder is the ``out`` of the current call (a copied or moved run writes
where it is now; paths stored in ``last.pt`` never redirect writes), and every option the caller
did not set comes from the checkpoint's saved ``TrainConfig`` (``epochs`` included: the run goes on
to its planned end). An option that the caller *set* takes the new value if it is one of
:data:`RESUMABLE_OPTIONS`; otherwise, when it differs from the saved run, it is an error naming it
with the old and the new value. Dataset paths (``data``, ``val_data``,
``test_data``) may change when they name the same file (same path, or same content): a moved run
can point at its data again.

Which options were set: the CLI knows (its flags default to None); from Python, the keyword
arguments of ``train(**options)``, or, for a ``TrainConfig``, the fields that differ from the
defaults (a value equal to its default cannot be told from an unset one).
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable

from fastchgnet.data.cache import file_hash
from fastchgnet.train.config import TrainConfig

__all__ = ["RESUMABLE_OPTIONS", "option_flag", "resume_config", "set_options"]

#: options that may change on resume: where and how the run executes, not what it computes (the
#: number of ranks may change too). ``out`` is always the current call's.
RESUMABLE_OPTIONS = ("out", "resume", "epochs", "progress", "device", "workers", "plots", "balance",
                     "bucket_mb", "dist_timeout", "log_every", "compile", "cache", "cache_workers",
                     "checkpoint_every", "eval_batch_size", "patience", "tensorboard")
_PATHS = ("data", "val_data", "test_data")
_FLAGS = {"prefactors": "--weights", "stage_two_prefactors": "--stage-two-weights",
          "refit_atom_ref": "--[no-]refit-atomref", "model_config": "--force-head/--stress-head",
          "progress": "--no-progress", "plots": "--no-plots"}


def option_flag(name: str) -> str:
    """The ``fastchgnet train`` flag of a TrainConfig field."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def set_options(config: TrainConfig) -> set[str]:
    """The fields of ``config`` that differ from the TrainConfig defaults."""
    default = TrainConfig().to_dict()
    mine = config.to_dict()
    return {f.name for f in fields(TrainConfig) if mine[f.name] != default[f.name]}


def _same_file(a: str | None, b: str | None) -> bool:
    if a == b:
        return True
    if a is None or b is None or not (Path(a).is_file() and Path(b).is_file()):
        return False
    try:
        return os.path.samefile(a, b) or file_hash(a) == file_hash(b)
    except OSError:
        return False


def _fmt(name: str, value: Any) -> str:
    if name == "lr" and value is None:
        return "the recipe's default"
    if name in ("split",):
        return ",".join(f"{x:g}" for x in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items()) \
            or "{}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(x) for x in value) or "(none)"
    return str(value)


def resume_config(config: TrainConfig, saved: dict[str, Any], given: Iterable[str], last: Path
                  ) -> TrainConfig:
    """The TrainConfig of a resumed run: ``saved`` (the checkpoint's ``train_config``) with the
    resumable options of ``config``; ``given``: the options the caller set. Raises ValueError
    naming every set option that the checkpoint cannot honour (old and new value)."""
    known = {f.name for f in fields(TrainConfig)}
    old_config = TrainConfig.from_dict({k: v for k, v in saved.items() if k in known})
    # a run saved without prefactors trained with its recipe's: name them, and keep them
    old = {**old_config.to_dict(), "prefactors": old_config.loss_prefactors}
    new = config.to_dict()
    merged = dict(old)
    conflicts = []
    for name in sorted(set(given) & known):
        if name in RESUMABLE_OPTIONS:
            merged[name] = new[name]
            continue
        if new[name] == old[name]:
            continue
        if name in _PATHS and _same_file(new[name], old[name]):
            merged[name] = new[name]  # the same dataset at another path (a moved run)
            continue
        conflicts.append(f"{option_flag(name)} {_fmt(name, new[name])} (the run has "
                         f"{_fmt(name, old[name])})")
    if conflicts:
        shown = [option_flag(n) for n in RESUMABLE_OPTIONS if n not in ("out", "resume", "eval_batch_size")]
        raise ValueError(
            f"--resume cannot change these options of the run in {last}: {', '.join(conflicts)}. "
            "Its optimiser state, schedule, batches and split were made with the saved values. "
            "Drop the option to continue the run as it was, or start a new run from its weights "
            f"(`--init {last.with_name('best.pt')} --out NEW_FOLDER`). Options that may change on "
            f"resume: {', '.join(shown)} (and --out, the run folder).")
    merged["out"] = new["out"]  # the folder given is the folder written
    merged["resume"] = True
    for name in _PATHS:  # a relative path saved by a run started elsewhere: say how to fix it
        path = merged[name]
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(
                f"--resume: the run's {option_flag(name)[2:]} file {path} (recorded in {last}) "
                f"does not exist from {os.getcwd()}: pass {option_flag(name)} with its path (the "
                "same file)")
    return TrainConfig.from_dict(merged)
