"""Training data: datasets over the graph cache, splits, batch samplers, collation and prefetch.

The path of a batch from disk to the model::

    GraphCache (memory-mapped shards)
      -> GraphDataset[i]                 one CachedSample (graph + labels), read lazily
      -> EpochBatchSampler               index lists, a permutation fixed by (seed, epoch)
      -> DataLoader workers + Collator   (Batch, Targets) on the host, pinned on CUDA
      -> DevicePrefetcher                copied host -> device on a side CUDA stream while the
                                         current step runs

Every sample is seen exactly once per epoch; the order depends only on ``(seed, epoch)``, so a
resumed run (even one resumed in the middle of an epoch) sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from fastchgnet.data.batch import Batch, collate
from fastchgnet.data.cache import CachedSample, GraphCache
from fastchgnet.train.loss import Targets, collate_targets

__all__ = [
    "Collator",
    "DevicePrefetcher",
    "EpochBatchSampler",
    "GraphDataset",
    "split_indices",
]


class GraphDataset(torch.utils.data.Dataset):
    """The samples ``indices`` (default: all) of a :class:`GraphCache`.

    ``dataset[i]`` reads sample ``indices[i]`` from the memory-mapped cache; only that sample's
    slices are touched, so a worker or a rank holds only what it reads.
    """

    def __init__(self, cache: GraphCache | str, indices: Sequence[int] | None = None) -> None:
        self.cache = cache if isinstance(cache, GraphCache) else GraphCache(cache)
        n = len(self.cache)
        idx = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError("indices must be one-dimensional")
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"indices out of range for a cache of {n} samples")
        self.indices = idx

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> CachedSample:
        return self.cache[int(self.indices[i])]

    def sizes(self) -> np.ndarray:
        """(len, 3) atoms, directed bonds and angles of each sample (from the cache's pointers)."""
        return self.cache.sizes()[self.indices]

    def subset(self, positions: Sequence[int]) -> "GraphDataset":
        return GraphDataset(self.cache, self.indices[np.asarray(positions, dtype=np.int64)])


def split_indices(n: int, fractions: Sequence[float] = (0.9, 0.05, 0.05),
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / validation / test indices of ``n`` samples: a seeded permutation cut by ``fractions``.

    The same ``(n, fractions, seed)`` always gives the same split. Validation and test get at
    least one sample each when their fraction is positive and ``n >= 3``; the rest is training.
    """
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or any(f < 0 for f in fr) or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    if n < 1:
        raise ValueError("cannot split an empty dataset")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(fr[1] * n))
    n_test = int(round(fr[2] * n))
    if n >= 3:
        n_val = max(n_val, 1 if fr[1] > 0 else 0)
        n_test = max(n_test, 1 if fr[2] > 0 else 0)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"dataset of {n} samples is too small for the split {fractions}")
    return (np.sort(perm[:n_train]), np.sort(perm[n_train:n_train + n_val]),
            np.sort(perm[n_train + n_val:]))


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of dataset positions; each epoch a permutation seeded by ``(seed, epoch)``.

    * ``shuffle=False`` keeps the dataset order (validation, test);
    * ``drop_last=False`` (default): the last batch of an epoch may be smaller — every sample is
      used exactly once per epoch;
    * ``no_single=True`` (the trainer's): when that last batch would hold a single structure, the
      last two batches share their samples evenly instead (``B + 1`` as ``ceil`` and ``floor`` of
      half), so no training batch has one structure: a compiled training step traced with
      several structures guards on that (Inductor specialises a view on it) and would compile a
      second graph, about two minutes on a 2-core CPU, for one batch per epoch;
    * ``set_epoch(e)`` selects the epoch, ``skip(k)`` starts the next iteration after the first
      ``k`` batches (resuming in the middle of an epoch).
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, no_single: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.n, self.batch_size, self.shuffle = int(n), int(batch_size), shuffle
        self.seed, self.drop_last, self.no_single = int(seed), drop_last, no_single
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip(self, n_batches: int) -> None:
        self._skip = int(n_batches)

    def order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def batches(self) -> list[np.ndarray]:
        order = self.order()
        cuts = range(0, self.n, self.batch_size)
        out = [order[i:i + self.batch_size] for i in cuts]
        if self.drop_last and out and len(out[-1]) < self.batch_size:
            out.pop()
        if self.no_single and len(out) >= 2 and len(out[-1]) == 1:
            both = np.concatenate(out[-2:])
            half = (len(both) + 1) // 2
            out[-2:] = [both[:half], both[half:]]
        return out

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[list[int]]:
        skip, self._skip = self._skip, 0
        for b in self.batches()[skip:]:
            yield b.tolist()


def sample_labels(s: CachedSample) -> dict[str, Any]:
    return {"e": s.energy_per_atom, "f": s.forces, "s": s.stress, "m": s.magmom}


@dataclass
class Collator:
    """``collate_fn`` for a DataLoader: samples -> ``(Batch, Targets, ids)`` on the host."""

    dtype: torch.dtype = torch.float32

    def __call__(self, samples: Sequence[CachedSample]) -> tuple[Batch, Targets, list[str]]:
        batch = collate([s.graph for s in samples], dtype=self.dtype)
        targets = collate_targets([sample_labels(s) for s in samples], batch, dtype=self.dtype)
        return batch, targets, [s.id for s in samples]


class DevicePrefetcher:
    """Iterate ``(Batch, Targets, ids)`` from ``loader`` already on ``device``.

    On CUDA the copy of batch k+1 is issued on a side stream (from pinned memory, non-blocking)
    before batch k is handed out, so it overlaps the step of batch k; the consumer's stream waits
    on the copy only when it takes the batch. On the CPU it is a plain pass-through.
    """

    def __init__(self, loader: Iterable[tuple[Batch, Targets, list[str]]],
                 device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        self.loader = loader
        self.device = torch.device(device)
        self.dtype = dtype
        self.cuda = self.device.type == "cuda"

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def _move(self, item: tuple[Batch, Targets, list[str]]) -> tuple[Batch, Targets, list[str]]:
        batch, targets, ids = item
        nb = self.cuda
        return (batch.to(self.device, self.dtype, non_blocking=nb),
                targets.to(self.device, self.dtype, non_blocking=nb), ids)

    def __iter__(self) -> Iterator[tuple[Batch, Targets, list[str]]]:
        it = iter(self.loader)
        if not self.cuda:
            for item in it:
                yield self._move(item)
            return
        stream = torch.cuda.Stream(device=self.device)

        def issue() -> tuple[Any, Any] | None:
            try:
                item = next(it)
            except StopIteration:
                return None
            with torch.cuda.stream(stream):
                moved = self._move(item)
                ev = torch.cuda.Event()
                ev.record(stream)
            return moved, ev

        nxt = issue()
        while nxt is not None:
            moved, ev = nxt
            torch.cuda.current_stream(self.device).wait_event(ev)
            for obj in moved[:2]:  # memory allocated on the side stream is used on the main one
                for v in vars(obj).values():
                    if isinstance(v, Tensor):
                        v.record_stream(torch.cuda.current_stream(self.device))
            nxt = issue()
            yield moved
