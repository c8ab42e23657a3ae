"""One training step, fastchgnet vs the reference chgnet (pytest-benchmark).

A step is :func:`fastchgnet.bench.train_step.ours_train_step` / ``chgnet_train_step``: forward
with energy, forces, stress and magnetic moments (``create_graph=True``), the CHGNet Huber loss
(delta 0.1; prefactors e 2, f 1.5, s 0.1, m 0.1; ours: the library's ``EFSMLoss``, as in the
Trainer), backward, Adam step, ``zero_grad``. Both start from the CHGNet 0.3.0 weights, each with
its own model and optimiser for this module (the session models of the prediction benchmarks are
not trained). Graphs are built and collated, and moved to the device, outside the timed step, as
a DataLoader would.

Batch sizes: ``FASTCHGNET_BENCH_TRAIN_BATCHES`` (comma-separated; default ``4,8`` on the CPU,
``16,32,64`` on CUDA) of MPtrj-like structures
(:func:`fastchgnet.bench.train_data.chgnet_like_batch`: shared LiMnO2/Li9Co7O16 cells and
supercells, strained and rattled, up to 16 atoms on the CPU and 64 on CUDA —
``FASTCHGNET_BENCH_TRAIN_MAX_ATOMS`` overrides).

``extra_info``: atoms, bonds, directed bonds, angles (sums over the batch), batch size, device,
kernels (the fused-op path taken: ``triton`` or ``torch``) and the requested
``FASTCHGNET_KERNELS``, ratio; on CUDA also ``peak_mib`` (peak allocated during one step),
``step_mib`` (the part of it above what was allocated before the step) and ``cuda_kernels``
(CUDA kernels launched by one step).
"""

from __future__ import annotations

import os

import pytest
import torch

from fastchgnet.bench.common import (
    bench_device_from_env,
    device_stats,
    load_our_model,
    load_reference,
    step_memory_mib,
    synced,
)
from fastchgnet.bench.train_data import chgnet_like_batch, default_max_atoms
from fastchgnet.bench.train_step import (
    LEARNING_RATE,
    chgnet_inputs,
    chgnet_train_step,
    default_batch_sizes,
    kernels_used,
    our_inputs,
    ours_train_step,
    reference_optimizer,
)
from fastchgnet.train.schedule import make_optimizer


_DEVICE = bench_device_from_env()  # as conftest.py; needed at collection time for the batch sizes
_CUDA = _DEVICE.startswith("cuda")


def _batch_sizes() -> tuple[int, ...]:
    raw = os.environ.get("FASTCHGNET_BENCH_TRAIN_BATCHES", "").strip()
    if raw:
        return tuple(int(b) for b in raw.split(",") if b.strip())
    return default_batch_sizes(_DEVICE)


BATCH_SIZES = _batch_sizes()
MAX_ATOMS = int(os.environ.get("FASTCHGNET_BENCH_TRAIN_MAX_ATOMS") or default_max_atoms(_DEVICE))
IMPLS = ("chgnet", "ours")
# per implementation and batch size; the CPU file takes ~1.5 min on 2 idle cores
ROUNDS = 10 if _CUDA else 3
WARMUP = 2 if _CUDA else 1


@pytest.fixture(scope="module")
def train_ours(device: str):
    """(model, optimiser, weights name): a fresh 0.3.0 model in training mode."""
    model, weights = load_our_model(device)
    model.train()
    return model, make_optimizer(model, LEARNING_RATE), weights


@pytest.fixture(scope="module")
def train_ref(device: str):
    """(model, optimiser): a fresh reference CHGNet 0.3.0 in training mode."""
    ref = load_reference(device)
    if ref is None:
        pytest.skip("chgnet is not installed")
    ref.train()
    return ref, reference_optimizer(ref)


@pytest.fixture(scope="module")
def train_data():
    """``get(batch_size)`` -> :class:`~fastchgnet.bench.train_data.TrainData` (cached; the same
    structures and labels for both implementations)."""
    cache: dict = {}

    def get(batch_size: int):
        if batch_size not in cache:
            cache[batch_size] = chgnet_like_batch(batch_size, seed=batch_size, max_atoms=MAX_ATOMS)
        return cache[batch_size]

    return get


# impl varies fastest: the two implementations of a batch size run one after the other
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch_size", BATCH_SIZES, ids=lambda b: f"b{b}")
def test_train_step(benchmark, request, ratio_book, device, train_data,
                    batch_size: int, impl: str) -> None:
    data = train_data(batch_size)
    model, opt, weights = request.getfixturevalue("train_ours")
    batch, targets, counts = our_inputs(data, model, device)  # counts for both impls
    if impl == "ours":
        def step():
            return ours_train_step(model, opt, batch, targets)
    else:
        ref, ref_opt = request.getfixturevalue("train_ref")
        graphs, ref_labels, ref_sizes = chgnet_inputs(
            data, request.getfixturevalue("ref_converter"), device)
        assert ref_sizes["ref_directed_bonds"] == counts["directed_bonds"]
        assert ref_sizes["ref_angles"] == counts["angles"]

        def step():
            return chgnet_train_step(ref, ref_opt, graphs, ref_labels)

    fn = synced(step, device)
    benchmark.group = f"train efsm b{batch_size}"
    benchmark.extra_info.update(
        **counts, batch_size=batch_size, max_atoms=MAX_ATOMS, device=device,
        kernels=kernels_used(device), kernels_requested=os.environ.get("FASTCHGNET_KERNELS", "auto"),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""), weights=weights,
        structures_from=data.source, torch_threads=torch.get_num_threads(),
    )
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    if device.startswith("cuda"):
        benchmark.extra_info.update(device_stats(fn, device))
        benchmark.extra_info["step_mib"] = step_memory_mib(fn, device)[1]
    benchmark.extra_info["loss"] = float(step())
    ratio_book.record(benchmark, impl)
