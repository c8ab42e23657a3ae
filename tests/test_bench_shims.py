"""The old benchmark module names (``fastchgnet.bench_md`` ...) still import, with a
DeprecationWarning, and give the objects of their new modules in ``fastchgnet.bench``."""

from __future__ import annotations

import importlib
import sys

import pytest

MOVED = {
    "fastchgnet.bench_md": ("fastchgnet.bench.md", ["main", "run_md_bench", "si_supercell",
                                                    "largest_cell", "_our_calculators"]),
    "fastchgnet.bench_memory": ("fastchgnet.bench.memory", ["main", "TensorMemoryTracker",
                                                            "largest_fit", "measure"]),
    "fastchgnet.bench_scaling": ("fastchgnet.bench.scaling", ["main", "Network", "allreduce_ms",
                                                              "expected_max_normal", "predict"]),
    "fastchgnet.bench_train": ("fastchgnet.bench.train_step", ["main", "run_train_bench",
                                                               "chgnet_like_batch",
                                                               "step_memory_mib"]),
    "fastchgnet.bench_trainer": ("fastchgnet.bench.trainer_epochs", ["main", "OursEpochs",
                                                                     "RefEpochs", "LOSS_RATIOS"]),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_name_warns_and_gives_the_new_objects(old, monkeypatch):
    new_name, names = MOVED[old]
    new = importlib.import_module(new_name)
    monkeypatch.delitem(sys.modules, old, raising=False)  # import the shim afresh
    with pytest.warns(DeprecationWarning, match=new_name.replace(".", r"\.")):
        shim = importlib.import_module(old)
    for name in names:
        assert getattr(shim, name) is getattr(new, name), name


def test_package_offers_the_former_module_names_lazily():
    import fastchgnet.bench as bench
    from fastchgnet.bench import common, predict

    assert bench.time_call is common.time_call and bench.text_table is common.text_table
    assert bench.main_bench is predict.main_bench and bench.run_bench is predict.run_bench
    assert set(bench.__all__) <= set(dir(bench))
    with pytest.raises(AttributeError, match="no_such_name"):
        bench.no_such_name  # noqa: B018
