"""Smoke test of the training-throughput benchmark (fastchgnet Trainer vs chgnet Trainer)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("chgnet")

from fastchgnet.bench import trainer_epochs as bench_trainer  # noqa: E402

ROW_KEYS = {"case", "device", "batch_size", "n_structures", "epochs", "steps_per_epoch", "atoms",
            "bonds", "directed_bonds", "angles", "ref_directed_bonds", "ref_angles", "ours_ms",
            "ref_ms", "ratio", "ours_structs_per_s", "ref_structs_per_s", "ours_params",
            "ref_params", "ours_workers", "kernels", "torch_threads"}


def test_main_tiny_run(tmp_path):
    out = io.StringIO()
    path = tmp_path / "trainer.json"
    rows = bench_trainer.main(["--device", "cpu", "--batch-sizes", "4", "--n-structures", "8",
                               "--max-atoms", "8", "--epochs", "1", "--repeats", "1",
                               "--warmup", "1", "--json", str(path)], stream=out)
    assert len(rows) == 1
    row = rows[0]
    assert ROW_KEYS <= set(row)
    assert row["case"] == "trainer efsm b4"
    assert (row["batch_size"], row["n_structures"], row["steps_per_epoch"]) == (4, 8, 2)
    for key in ("ours_ms", "ref_ms", "ratio", "ours_structs_per_s", "ref_structs_per_s",
                "atoms", "angles"):
        assert row[key] > 0, key
    # the same graphs and the same architecture on both sides
    assert row["ref_directed_bonds"] == row["directed_bonds"]
    assert row["ref_angles"] == row["angles"]
    assert row["ours_params"] == row["ref_params"]
    assert row["ratio"] == pytest.approx(row["ours_structs_per_s"] / row["ref_structs_per_s"])
    text = out.getvalue()
    assert "trainer efsm b4" in text and "ours/chgnet" in text
    saved = json.loads(path.read_text())
    assert saved["rows"][0]["case"] == "trainer efsm b4"
    assert saved["environment"]["chgnet"]
    # the CPU generation and the vector ISA torch dispatches to: ratios differ between them
    assert saved["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if Path("/proc/cpuinfo").is_file():
        assert saved["environment"]["cpu_model"].startswith("family ")
    assert saved["settings"]["loss_ratios"] == bench_trainer.LOSS_RATIOS
