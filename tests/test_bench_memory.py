"""The tensor-memory tracker behind the CPU memory benchmark, and the benchmark on tiny sizes."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from fastchgnet.bench.memory import TensorMemoryTracker, largest_fit, main, peak_tensor_mib

HAS_CHGNET = importlib.util.find_spec("chgnet") is not None
MB4 = 1000 * 1000 * 4  # a 1000 x 1000 float32 tensor


def test_peak_counts_live_storages_and_their_release():
    def f() -> torch.Tensor:
        a = torch.ones(1000, 1000)
        b = a @ a  # a and b live: 8 MB
        del a
        c = b * 2  # b and c live: 8 MB
        del b
        return c

    with TensorMemoryTracker() as t:
        c = f()
        assert t.live == MB4  # c alone
    assert t.peak == 2 * MB4
    del c
    assert t.live == 0


def test_views_count_once_and_preexisting_tensors_not_at_all():
    x = torch.ones(1000, 1000)  # before the tracker: not counted
    with TensorMemoryTracker() as t:
        y = x + 1
        views = [y[:10], y.T, y.view(-1)]  # share y's storage
    assert t.peak == MB4 and t.live == MB4
    del y, views
    assert t.live == 0


def test_backward_in_the_calling_thread_is_counted():
    x = torch.ones(1000, 1000, requires_grad=True)
    with_grad = peak_tensor_mib(lambda: torch.autograd.grad((x * x).sin().sum(), x))
    forward_only = peak_tensor_mib(lambda: (x * x).sin().sum())
    assert with_grad > forward_only >= 2 * MB4 / 2**20


def test_linear_fit_of_memory_against_size():
    rows = [{"n_atoms": 100, "m": 60.0}, {"n_atoms": 200, "m": 110.0}, {"n_atoms": 400, "m": 210.0}]
    fit = largest_fit(rows, "m", budget_gib=1.0)
    assert fit["mib_per_atom"] == pytest.approx(0.5) and fit["intercept_mib"] == pytest.approx(10.0)
    assert fit["atoms_in_budget"] == pytest.approx((1024 - 10) / 0.5)
    assert largest_fit(rows[:1], "m") is None


@pytest.mark.slow
def test_benchmark_rows_on_tiny_sizes(tmp_path):
    """Training rows: the heads step (no second-order graph) needs less than the exact step;
    MD rows grow with the cell; the record is written."""
    res = main(["--train-batch-sizes", "2", "--max-atoms", "8", "--models", "exact,heads",
                "--md-atoms", "16,64", "--threads", "1", "--json", str(tmp_path / "m.json")]
               + ([] if HAS_CHGNET else ["--no-reference"]))
    (train,) = res["train"]
    assert 0 < train["heads_mib"] < train["exact_mib"]
    small, large = res["md"]
    assert 0 < small["ours_mib"] < large["ours_mib"]
    assert res["fit"]["ours_mib"]["mib_per_atom"] > 0
    if HAS_CHGNET:
        assert train["ref_mib"] > 0 and large["ref_mib"] > 0
        assert train["ref_over_heads"] == pytest.approx(train["ref_mib"] / train["heads_mib"])
    rec = json.loads((tmp_path / "m.json").read_text())
    assert rec["rows"][0]["md"][1]["n_atoms"] == large["n_atoms"]


def test_a_step_past_the_memory_limit_is_recorded_not_killed():
    """Under limit_memory an allocation past the cap raises, and measure() records None."""
    import subprocess
    import sys

    code = """
import resource, torch
from fastchgnet.bench.memory import limit_memory, measure
vm = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
limit_memory(vm / 2**30 + 1.0)  # 1 GiB above what the process maps now
assert measure(lambda: torch.ones(2**27)) is not None  # 512 MiB fits
assert measure(lambda: torch.ones(2**30)) is None  # 4 GiB does not
assert measure(lambda: [torch.ones(2**25) for _ in range(4)]) is not None  # the space came back
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


@pytest.mark.slow
def test_isolated_measurements_equal_in_process_ones(tmp_path):
    """--isolate runs every (size, implementation) in its own process: same numbers."""
    argv = ["--train-batch-sizes", "2", "--max-atoms", "8", "--models", "heads", "--md-atoms", "16",
            "--threads", "1", "--no-reference"]
    here = main(argv)
    apart = main(argv + ["--isolate"])
    assert apart["train"][0]["heads_mib"] == here["train"][0]["heads_mib"]
    assert apart["train"][0]["atoms"] == here["train"][0]["atoms"]
    assert apart["md"][0]["ours_mib"] == here["md"][0]["ours_mib"]
