"""Fine-tuning time-to-accuracy, our defaults vs chgnet's Trainer (pytest-benchmark, small case).

One round = one fine-tune of CHGNet 0.3.0 on the first ``FASTCHGNET_BENCH_FINETUNE_N`` (default
40) frames of mlearn ``<El>/training.json`` (``FASTCHGNET_BENCH_FINETUNE_ELEMENT``, default Ge;
seeded 90/10 train/val split, seed 0), 3 epochs at batch 8, then the test MAEs of the final model
on ``<El>/test.json`` by the same code for both (see :mod:`fastchgnet.bench.finetune`):

* ``ours``: ``fastchgnet.train.train`` with the defaults of ``fastchgnet train --init 0.3.0``;
* ``chgnet``: ``chgnet.trainer.Trainer`` at its defaults.

The timed call is the whole run (training, then the test evaluation), so ``ratio`` (chgnet /
ours, > 1: ours faster) is of that. ``extra_info`` also holds ``wall_s`` (start to the end of
the last epoch), the test MAEs (meV/atom, meV/Å, GPa), the validation curve, and, once both ran,
``wall_ratio``, ``e_ratio``, ``f_ratio`` (ours / chgnet: < 1 is better for ours) and
``time_to_target_s`` (time to the reference's final validation energy MAE). The full
measurement (four elements, all frames, two seeds) is ``scripts/finetune_time_to_accuracy.py``.
Skipped without the mlearn data (``FASTCHGNET_MLEARN_DIR`` or ``../shared/data/mlearn``).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from fastchgnet.bench.finetune import compare, mlearn_root, run

ELEMENT = os.environ.get("FASTCHGNET_BENCH_FINETUNE_ELEMENT", "Ge")
N_FRAMES = int(os.environ.get("FASTCHGNET_BENCH_FINETUNE_N", "40"))
SEED = 0
_RESULTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}


@pytest.mark.parametrize("impl", ("chgnet", "ours"))
def test_finetune_time_to_accuracy(benchmark, ratio_book, device, tmp_path, impl: str) -> None:
    if not (mlearn_root() / ELEMENT / "training.json").is_file():
        pytest.skip(f"no mlearn data at {mlearn_root() / ELEMENT}")
    if device != "cpu":
        pytest.skip("the fine-tuning comparison runs on the CPU (chgnet's Trainer use_device='cpu')")
    if impl == "chgnet":
        pytest.importorskip("chgnet")
    box: dict[str, Any] = {}
    calls = iter(range(100))

    def fn() -> None:
        box["res"] = run(impl, ELEMENT, SEED, tmp_path / f"r{next(calls)}", limit=N_FRAMES)

    benchmark.group = f"finetune {ELEMENT} {N_FRAMES} frames 3 epochs b8"
    benchmark.pedantic(fn, rounds=1, warmup_rounds=0, iterations=1)
    res = box["res"]
    info = benchmark.extra_info
    info.update(element=ELEMENT, n_frames=N_FRAMES, n_train=res["n_train"], n_val=res["n_val"],
                seed=SEED, epochs=3, batch_size=8, torch_threads=torch.get_num_threads(),
                wall_s=res["wall_s"], e_mae=res["test"]["e_mae"], f_mae=res["test"]["f_mae"],
                s_mae=res["test"]["s_mae"],
                val_curve=[(r["t_s"], r["val_e_mae"]) for r in res["epochs"]])
    _RESULTS[impl] = (res, info)
    if "ours" in _RESULTS and "chgnet" in _RESULTS:
        c = compare(_RESULTS["ours"][0], _RESULTS["chgnet"][0])
        for _, extra in _RESULTS.values():
            extra.update(wall_ratio=c["wall_ratio"], e_ratio=c["e_ratio"], f_ratio=c["f_ratio"],
                         ours_time_to_target_s=c["ours_time_to_target_s"],
                         ref_time_to_target_s=c["ref_time_to_target_s"])
    ratio_book.record(benchmark, impl)
    assert res["test"]["n"] > 0 and res["wall_s"] > 0
