"""What a training run does when things go wrong: divergence, non-finite weights, checkpoints that
cannot be written or read. See docs/training.md, "What happens when things go wrong".

* **Divergence.** The run stops with :class:`TrainingDivergedError` (naming the epoch, the step and
  the loss) when the training loss is not finite, or when an epoch's mean training loss exceeds
  :data:`DIVERGENCE_FACTOR` (1000) times the lowest epoch mean so far. Mid-epoch checkpoints apply
  the same rule to the running mean of the epoch so far. A normal run's epoch loss does not grow
  by 1000x; a diverging one (too high a learning rate) grows by many orders of magnitude.
* **Non-finite weights are never saved.** Every checkpoint (``last.pt``, ``best.pt``, the mid-epoch
  ones) is checked first; the error says what the files on disk still hold (read from them, so it
  is true).
* **Checkpoint writes** go to a temporary file renamed over the old one only when complete: a
  failed write (disk full, ...) leaves the previous file intact, and :class:`CheckpointWriteError`
  says so, with the file and the operating system's reason.
* **Checkpoint reads** on ``--resume``: an unreadable file is an :class:`UnreadableCheckpointError`
  naming it and what to do.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

__all__ = ["DIVERGENCE_FACTOR", "CheckpointWriteError", "TrainingDivergedError",
           "UnreadableCheckpointError", "checkpoint_summary", "count_nonfinite", "read_checkpoint",
           "write_checkpoint"]

#: an epoch's mean training loss above this factor times the best epoch's is a divergence
DIVERGENCE_FACTOR = 1e3


class TrainingDivergedError(FloatingPointError):
    """The training loss became non-finite or diverged; nothing was saved from that state."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous file is intact."""


class UnreadableCheckpointError(ValueError):
    """A checkpoint file is truncated, corrupt or not a training checkpoint."""


def count_nonfinite(tensors: Iterable[Tensor]) -> tuple[int, int]:
    """``(non-finite, total)`` number of values in the floating-point ``tensors`` (one host sync)."""
    bad: list[Tensor] = []
    total = 0
    for t in tensors:
        if torch.is_floating_point(t):
            bad.append(torch.count_nonzero(~torch.isfinite(t.detach())).to("cpu", torch.int64))
            total += t.numel()
    return (int(torch.stack(bad).sum()) if bad else 0), total


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its first sentence when the line is long)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    cut = line.find(". ", 40)
    return line[:cut + 1] if len(line) > 160 and cut > 0 else line


def checkpoint_summary(path: Path) -> str:
    """What ``path`` holds now, read from the file: ``"runs/x/last.pt holds step 8 (epoch 2)"``."""
    if not path.is_file():
        return f"{path} was not written yet"
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- any unreadable file is reported as such
        return f"{path} is unreadable ({type(exc).__name__})"
    tr = ck.get("trainer") if isinstance(ck, dict) else None
    if isinstance(tr, dict):
        step, epoch, into = tr.get("step"), tr.get("epoch"), tr.get("step_in_epoch") or 0
        where = (f"{into} step{'s' if into != 1 else ''} into epoch {epoch + 1}" if into
                 else f"end of epoch {epoch}")
        return f"{path} holds step {step} ({where})"
    if isinstance(ck, dict) and "epoch" in ck:
        return f"{path} holds the model of epoch {ck['epoch']}"
    return f"{path} exists"


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The training checkpoint ``path`` (``last.pt``) for a resume; a clear error when it is
    missing, unreadable or has no trainer state."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint {path}")
    best = path.with_name("best.pt")
    restart = (f" To keep the trained model, start a new run from {best} (`--init {best} "
               "--out NEW_FOLDER`; it holds the weights but not the optimiser state)."
               if best.is_file() and best != path else "")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- torch raises many types for a damaged file
        size = path.stat().st_size
        what = "it is empty (0 bytes)" if size == 0 else f"{size} bytes"
        raise UnreadableCheckpointError(
            f"--resume: {path} cannot be read ({what}; {type(exc).__name__}: {_first_line(exc)}). "
            "It is truncated or corrupt. fastchgnet writes checkpoints to a temporary file and "
            "renames it when complete, so this comes from an interrupted copy or move of the run "
            "folder, or a damaged disk: copy last.pt again from the original folder or a backup."
            + restart) from exc
    if not isinstance(ck, dict) or not isinstance(ck.get("trainer"), dict) \
            or "train_config" not in ck["trainer"]:
        raise UnreadableCheckpointError(
            f"--resume: {path} has no trainer state (is it a best.pt or a model file?); a run "
            "folder's last.pt holds it." + restart)
    return ck


def _os_reason(exc: BaseException, folder: Path) -> str:
    """The operating system's reason for a failed write, as well as it can be told (the first
    errno in the chain of causes, else the innermost cause's message and the free space)."""
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    for e in chain:
        if isinstance(e, OSError) and e.errno is not None:
            return f"{os.strerror(e.errno)} [errno {e.errno}]"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    text = f"{type(chain[-1]).__name__}: {_first_line(chain[-1])}"
    if free is not None and free < 64 * 2**20:
        return f"{os.strerror(errno.ENOSPC)}: {free / 2**20:.1f} MiB free in {folder} ({text})"
    return text


def write_checkpoint(save: Callable[[], Any], path: Path) -> None:
    """Run ``save()`` (an atomic write of ``path``); a failure raises :class:`CheckpointWriteError`
    that names the file, says that the previous one is intact and gives the OS reason."""
    try:
        save()
    except Exception as exc:  # noqa: BLE001 -- torch reports I/O errors as RuntimeError
        prev = (f"nothing was lost: {checkpoint_summary(path)}, intact" if path.is_file() else
                "no previous file existed")
        raise CheckpointWriteError(
            f"could not write {path}: {_os_reason(exc, path.parent)}. The checkpoint is written to "
            f"a temporary file and renamed only when complete, so {prev}. Free space in "
            f"{path.parent} (or fix the cause) and continue with --resume.") from exc
