"""Load balancing for data-parallel training: split every global batch over the ranks.

The cost of a sample is ``atoms + directed bonds + angles`` (from the graph cache's pointers,
:meth:`fastchgnet.data.cache.GraphCache.sizes`): the step time of one rank grows with the sum of
its samples' costs, and the slowest rank sets the step time of all of them. The coefficient of
variation (CV = standard deviation / mean) of the per-rank costs of a step measures the imbalance.

Policies (:data:`POLICIES`), applied to each global batch separately:

* ``"none"`` — rank ``r`` takes the ``r``-th contiguous chunk of the shuffled global batch
  (what a plain distributed sampler does; equal counts, random costs);
* ``"paper"`` — the FastCHGNet scheme: sort the batch by cost, then the ranks in turn each take
  the smallest and the largest sample remaining (equal counts, +-1; with fewer than two samples
  per rank the pairs are split so that no rank is empty);
* ``"greedy"`` (default) — longest processing time first: samples in decreasing cost, each onto
  the rank with the least cost so far, then a local search that moves or swaps samples between the
  most and the least loaded rank while that narrows their gap (down to 0.1 % of the mean load).
  Counts may differ between ranks; the training loss is normalised by global label counts, so
  this does not change the gradient.

Every policy is a pure function of the batch and the costs (ties broken by position), so a
partition depends only on ``(seed, epoch)`` and the world size.
"""

from __future__ import annotations

import heapq
from typing import Iterator, Sequence

import numpy as np
import torch

from fastchgnet.train.data import EpochBatchSampler

__all__ = ["POLICIES", "DistributedBatchSampler", "load_cv", "partition", "sample_costs",
           "synthetic_sizes"]

POLICIES = ("none", "paper", "greedy")


def sample_costs(sizes: np.ndarray) -> np.ndarray:
    """(n,) cost of each sample: atoms + directed bonds + angles of a ``(n, 3)`` sizes array."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.ndim != 2 or sizes.shape[1] != 3:
        raise ValueError(f"sizes must be (n, 3) atoms, bonds, angles; got shape {sizes.shape}")
    return sizes.sum(1)


def load_cv(loads: Sequence[float] | np.ndarray) -> float:
    """Coefficient of variation (population std / mean) of per-rank loads; 0 for one rank."""
    x = np.asarray(loads, dtype=np.float64)
    mean = x.mean() if x.size else 0.0
    return float(x.std() / mean) if mean > 0 else 0.0


def partition(costs: np.ndarray, n_ranks: int, policy: str = "greedy") -> list[np.ndarray]:
    """Split positions ``0..len(costs)-1`` over ``n_ranks``; returns one position array per rank.

    Every position goes to exactly one rank and, when ``len(costs) >= n_ranks``, every rank
    gets at least one. Within a rank positions are in increasing order.
    """
    costs = np.asarray(costs, dtype=np.int64)
    n = len(costs)
    if n_ranks < 1:
        raise ValueError(f"n_ranks must be >= 1, got {n_ranks}")
    if policy not in POLICIES:
        raise ValueError(f"unknown balance policy {policy!r}; use one of {POLICIES}")
    if n_ranks == 1:
        return [np.arange(n)]
    if policy == "none":
        return [np.asarray(c) for c in np.array_split(np.arange(n), n_ranks)]
    if policy == "paper":
        return _paper(costs, n_ranks)
    return _greedy(costs, n_ranks)


def _paper(costs: np.ndarray, n_ranks: int) -> list[np.ndarray]:
    order = np.argsort(costs, kind="stable")
    n = len(order)
    # units of (smallest, largest) remaining, dealt to the ranks in turn; with fewer than two
    # samples per rank, pairs are split (largest first) so that no rank is left empty
    units = [[int(order[i]), int(order[n - 1 - i])] if i != n - 1 - i else [int(order[i])]
             for i in range((n + 1) // 2)]
    k = 0
    while len(units) < min(n, n_ranks):
        while len(units[k]) < 2:
            k += 1
        units.insert(k + 1, [units[k].pop()])
        k += 2
    parts: list[list[int]] = [[] for _ in range(n_ranks)]
    for j, unit in enumerate(units):
        parts[j % n_ranks].extend(unit)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _greedy(costs: np.ndarray, n_ranks: int, max_rounds: int = 64) -> list[np.ndarray]:
    order = np.argsort(-costs, kind="stable").tolist()
    cost_list = costs.tolist()  # plain ints: the loop below runs per sample
    heap = [(0, r) for r in range(n_ranks)]  # (load, rank): ties go to the lower rank
    owner_list = [0] * len(cost_list)
    for i in order:
        load, r = heap[0]
        owner_list[i] = r
        heapq.heapreplace(heap, (load + cost_list[i], r))
    owner = np.asarray(owner_list, dtype=np.int64)
    loads = np.bincount(owner, weights=costs, minlength=n_ranks).astype(np.int64)
    good_enough = max(1, int(1e-3 * loads.mean()))  # a spread of 0.1 % of the mean load
    for _ in range(max_rounds):  # local search between the most and the least loaded rank
        hi, lo = int(np.argmax(loads)), int(np.argmin(loads))
        gap = loads[hi] - loads[lo]
        if gap <= good_enough:
            break
        a = np.flatnonzero(owner == hi)
        b = np.flatnonzero(owner == lo)
        # a move of x (hi -> lo) or a swap of x with y changes the gap by -2d, d = c_x - c_y;
        # the best d is the one closest to gap / 2 with 0 < d < gap
        best_d, best = 0, None
        if len(a) > 1:  # keep at least one sample on every rank
            d = costs[a]
            k = int(np.argmin(np.abs(2 * d - gap)))
            if 0 < d[k] < gap:
                best_d, best = int(d[k]), (a[k], None)
        if len(b):
            d = costs[a][:, None] - costs[b][None, :]
            k = np.unravel_index(int(np.argmin(np.abs(2 * d - gap))), d.shape)
            if 0 < d[k] < gap and abs(2 * d[k] - gap) < abs(2 * best_d - gap):
                best_d, best = int(d[k]), (a[k[0]], b[k[1]])
        if best is None:
            break
        x, y = best
        owner[x] = lo
        if y is not None:
            owner[y] = hi
        loads[hi] -= best_d
        loads[lo] += best_d
    return [np.flatnonzero(owner == r) for r in range(n_ranks)]


def synthetic_sizes(n: int, seed: int = 0) -> np.ndarray:
    """(n, 3) atoms, directed bonds, angles of a long-tailed, MPtrj-like synthetic data set.

    Atoms per structure log-normal (median ~ 19, 1 to 444 as in MPtrj); about 2 x 12-40 directed
    bonds (3 Å) and 40-400 angles per atom, varying with the density of the structure. For tests
    and benchmarks of the balancer; real runs use the cache's sizes.
    """
    rng = np.random.default_rng(seed)
    atoms = np.clip(np.round(rng.lognormal(np.log(19.0), 0.75, n)), 1, 444).astype(np.int64)
    density = rng.uniform(0.3, 1.0, n)
    bonds = np.round(atoms * 2 * (12 + 28 * density)).astype(np.int64)
    angles = np.round(atoms * (40 + 360 * density ** 2)).astype(np.int64)
    return np.stack([atoms, bonds, angles], axis=1)


class DistributedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """This rank's share of every global batch, balanced by ``policy``.

    The global batches are those of :class:`~fastchgnet.train.data.EpochBatchSampler` with
    ``global_batch_size`` (a permutation fixed by ``(seed, epoch)``, cut into batches), so they do
    not depend on the number of ranks: a run resumed on another number of ranks continues with
    the same global batches. Each global batch is split over the ranks with :func:`partition`.

    Last batch: the last global batch of an epoch holds the ``n % global_batch_size`` remaining
    samples. When it has fewer samples than there are ranks it is merged into the batch before it
    (that step is larger), so every rank has at least one sample in every step and every sample is
    still used exactly once per epoch. With ``drop_last=True`` the short batch is dropped instead.
    Fewer samples than ranks is an error.

    ``set_epoch``/``skip`` as in ``EpochBatchSampler``; :meth:`step_cv` gives the CV of the
    per-rank costs of each step, :meth:`global_sizes` the number of samples of each step.
    """

    def __init__(self, costs: np.ndarray, global_batch_size: int, world_size: int, rank: int, *,
                 policy: str = "greedy", shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        self.costs = np.asarray(costs, dtype=np.int64)
        n = len(self.costs)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        if policy not in POLICIES:
            raise ValueError(f"unknown balance policy {policy!r}; use one of {POLICIES}")
        if global_batch_size < world_size:
            raise ValueError(f"the global batch size ({global_batch_size}) must be at least the "
                             f"number of ranks ({world_size}): every rank needs a sample per step")
        if n < world_size:
            raise ValueError(f"{n} training samples cannot be spread over {world_size} ranks")
        self.base = EpochBatchSampler(n, global_batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.world_size, self.rank, self.policy = int(world_size), int(rank), policy
        self._skip = 0
        # the current epoch's global batches, and their partitions computed as they are needed
        # (at the pace of the DataLoader, not all at the start of an epoch)
        self._epoch: int | None = None
        self._batches: list[np.ndarray] = []
        self._parts: dict[int, list[np.ndarray]] = {}

    @property
    def epoch(self) -> int:
        return self.base.epoch

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def skip(self, n_batches: int) -> None:
        self._skip = int(n_batches)

    def global_batches(self) -> list[np.ndarray]:
        """The global batches of the current epoch (dataset positions), after the last-batch rule."""
        if self._epoch != self.epoch:
            out = self.base.batches()
            if len(out) > 1 and len(out[-1]) < self.world_size:
                out[-2:] = [np.concatenate(out[-2:])]
            self._epoch, self._batches, self._parts = self.epoch, out, {}
        return self._batches

    def shares(self, step: int) -> list[np.ndarray]:
        """The positions of every rank in global batch ``step`` of the current epoch."""
        batches = self.global_batches()
        if step not in self._parts:
            b = batches[step]
            self._parts[step] = [b[p] for p in partition(self.costs[b], self.world_size, self.policy)]
        return self._parts[step]

    def partitions(self) -> list[list[np.ndarray]]:
        """For each global batch of the current epoch, the positions of every rank."""
        return [self.shares(k) for k in range(len(self.global_batches()))]

    def cv(self, step: int) -> float:
        """CV of the per-rank costs of global batch ``step``."""
        return load_cv([self.costs[p].sum() for p in self.shares(step)])

    def step_cv(self) -> np.ndarray:
        """(steps,) CV of the per-rank costs of every step of the current epoch."""
        return np.array([self.cv(k) for k in range(len(self.global_batches()))])

    def global_sizes(self) -> np.ndarray:
        """(steps,) number of samples of every global batch of the current epoch."""
        return np.array([len(b) for b in self.global_batches()], dtype=np.int64)

    def __len__(self) -> int:
        n, b = len(self.costs), self.base.batch_size
        full, rest = divmod(n, b)
        if rest and (self.base.drop_last or (full and rest < self.world_size)):
            return full
        return full + (1 if rest else 0)

    def __iter__(self) -> Iterator[list[int]]:
        skip, self._skip = self._skip, 0
        for k in range(skip, len(self.global_batches())):
            yield self.shares(k)[self.rank].tolist()
