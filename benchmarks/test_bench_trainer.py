"""Training throughput, fastchgnet's Trainer vs chgnet's Trainer (pytest-benchmark).

One benchmark round = one training epoch over the same MPtrj-like labelled structures
(:func:`fastchgnet.bench.train_data.chgnet_like_batch`), see :mod:`fastchgnet.bench.trainer_epochs`
for what each side times:

* ``chgnet``: ``chgnet.trainer.Trainer._train(train_loader, epoch)`` on a fresh ``CHGNet()``,
  loader from ``StructureData`` + ``get_train_val_test_loader`` (graphs converted and cached by
  ``StructureData`` before timing);
* ``ours``: ``fastchgnet.train.Trainer.fit()`` for one epoch (``cfg.epochs`` one more than the
  epochs done; no validation set, so no validation, but ``metrics.csv`` and ``last.pt`` are
  written at the epoch's end), graphs from a graph cache built before timing.

Both: efsm targets, Adam lr 1e-3, Huber delta 0.1, prefactors e 1, f 1, s 0.1, m 0.1 (chgnet's
Trainer defaults), default CHGNet 0.3.0 architecture. Each (batch size, impl) gets a fresh trainer.

Environment: ``FASTCHGNET_BENCH_TRAINER_BATCHES`` (comma-separated; default ``8`` on the CPU,
``16,32,64`` on CUDA), ``FASTCHGNET_BENCH_TRAINER_N`` (training-set size; default 16 on the CPU,
256 on CUDA), ``FASTCHGNET_BENCH_TRAINER_MAX_ATOMS`` (default 16 on the CPU, 64 on CUDA).
The defaults keep the CPU file at well under a minute; ``python -m
fastchgnet.bench.trainer_epochs`` is the full-size, interleaved measurement.

``extra_info``: ``n_structures``, ``steps_per_epoch``, ``atoms``/``angles`` (training set),
``structs_per_s`` (from the median), batch size, device, kernels, ratio (chgnet/ours time = ours/
chgnet throughput); on CUDA ``peak_mib`` (peak allocated during one epoch) and ``epoch_mib``
(the part above what was allocated before it).
"""

from __future__ import annotations

import os

import pytest
import torch

from fastchgnet.bench.common import bench_device_from_env, step_memory_mib, synced
from fastchgnet.bench.train_data import chgnet_like_batch, default_max_atoms
from fastchgnet.bench.train_step import kernels_used
from fastchgnet.bench.trainer_epochs import OursEpochs, RefEpochs, chgnet_dataset, our_dataset


_DEVICE = bench_device_from_env()  # as conftest.py; needed at collection time for the batch sizes
_CUDA = _DEVICE.startswith("cuda")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def _batch_sizes() -> tuple[int, ...]:
    raw = os.environ.get("FASTCHGNET_BENCH_TRAINER_BATCHES", "").strip()
    if raw:
        return tuple(int(b) for b in raw.split(",") if b.strip())
    return (16, 32, 64) if _CUDA else (8,)


BATCH_SIZES = _batch_sizes()
N_STRUCTURES = _env_int("FASTCHGNET_BENCH_TRAINER_N", 256 if _CUDA else 16)
MAX_ATOMS = _env_int("FASTCHGNET_BENCH_TRAINER_MAX_ATOMS", default_max_atoms(_DEVICE))
IMPLS = ("chgnet", "ours")
ROUNDS = 5 if _CUDA else 2
WARMUP = 1
EPOCHS = ROUNDS + WARMUP + 2  # schedule length; +1 for the memory epoch on CUDA


@pytest.fixture(scope="module")
def trainer_data(tmp_path_factory):
    """(TrainData, our GraphDataset over a fresh graph cache)."""
    data = chgnet_like_batch(N_STRUCTURES, seed=0, max_atoms=MAX_ATOMS)
    return data, our_dataset(data, tmp_path_factory.mktemp("trainer-cache"))


@pytest.fixture(scope="module")
def ref_dataset(trainer_data):
    """chgnet's StructureData of the same structures, graphs converted and cached."""
    pytest.importorskip("chgnet")
    return chgnet_dataset(trainer_data[0])


# impl varies fastest: the two trainers of a batch size run one after the other
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch_size", BATCH_SIZES, ids=lambda b: f"b{b}")
def test_trainer_epoch(benchmark, request, ratio_book, device, trainer_data, tmp_path,
                       batch_size: int, impl: str) -> None:
    data, ours_ds = trainer_data
    if impl == "ours":
        run = OursEpochs(ours_ds, batch_size, device, tmp_path / "ours", epochs=EPOCHS)
    else:
        run = RefEpochs(request.getfixturevalue("ref_dataset"), batch_size, device, epochs=EPOCHS)
    sizes = ours_ds.sizes()

    fn = synced(lambda: run(1), device)
    benchmark.group = f"trainer epoch b{batch_size}"
    benchmark.extra_info.update(
        n_structures=len(data), steps_per_epoch=run.steps_per_epoch,
        atoms=int(sizes[:, 0].sum()), angles=int(sizes[:, 2].sum()), batch_size=batch_size,
        max_atoms=MAX_ATOMS, device=device, kernels=kernels_used(device),
        structures_from=data.source, torch_threads=torch.get_num_threads(),
    )
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["structs_per_s"] = len(data) / float(stats.stats.median)
    if device.startswith("cuda"):
        peak, epoch = step_memory_mib(fn, device)
        benchmark.extra_info.update(peak_mib=peak, epoch_mib=epoch)
    ratio_book.record(benchmark, impl)
