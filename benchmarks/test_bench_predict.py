"""Batched prediction, fastchgnet vs the reference ``CHGNet.predict_structure``.

16 varied structures of 8-32 atoms (the shared LiMnO2 and Li9Co7O16 cells and small supercells,
strained and rattled; built-in prototypes when the CIFs are absent), predicted with task ``e``
(energy) and ``efsm`` (energy, forces, stress, magmoms) at batch size 1 and 16. One call predicts
all 16 structures end to end: graph construction, batching, model, results back on the host.

``extra_info``: atoms, bonds, directed bonds, angles (sums over the 16 graphs), task, batch size,
dtype, device, ratio; on CUDA also the peak memory and the CUDA kernels of one call.
"""

from __future__ import annotations

import pytest

import fastchgnet
from fastchgnet.bench.common import device_stats, graph_counts, quiet, synced

TASKS = ("e", "efsm")
BATCH_SIZES = (1, 16)
IMPLS = ("chgnet", "ours")
ROUNDS = 3  # per implementation and case; with 1 warm-up round the file takes ~40 s on 2 idle cores


# impl varies fastest: the two implementations of a case run one after the other
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch_size", BATCH_SIZES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("task", TASKS)
def test_predict(benchmark, request, ratio_book, structures, device, our_model,
                 task: str, batch_size: int, impl: str) -> None:
    items = structures.batch
    if impl == "ours":
        model = our_model

        def call():
            return model.predict(items, task=task, batch_size=batch_size)
    else:
        ref = request.getfixturevalue("ref_model")

        def call():
            with quiet():
                return ref.predict_structure(items, task=task, batch_size=batch_size)

    fn = synced(call, device)
    counts = graph_counts([fastchgnet.build_graph(s) for s in items])
    benchmark.group = f"predict {task} {len(items)}x b{batch_size}"
    benchmark.extra_info.update(
        **counts, n_structures=len(items), task=task, batch_size=batch_size,
        dtype=str(next(our_model.parameters()).dtype).replace("torch.", ""), device=device,
        structures_from=structures.source,
    )
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(device_stats(fn, device))
    ratio_book.record(benchmark, impl)
