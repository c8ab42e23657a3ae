"""The MD-step benchmark's options: Si supercells, step variants and the largest-cell search
(no timings are asserted; those belong to benchmarks/)."""

from __future__ import annotations

import json

import pytest

from fastchgnet.bench import md as bench_md
from fastchgnet.bench.common import partial_saver
from fastchgnet.md import calculator as calc_mod


@pytest.mark.parametrize("n", [1, 8, 9, 100, 2000])
def test_si_supercell_has_at_least_n_atoms_and_is_nearly_cubic(n):
    atoms = bench_md.si_supercell(n)
    reps = [round(x) for x in atoms.cell.lengths() / 5.43]
    assert len(atoms) >= n and len(atoms) == 8 * reps[0] * reps[1] * reps[2]
    assert max(reps) - min(reps) <= 1
    # the smallest such supercell: one repetition fewer along the longest axis is too small
    if len(atoms) > 8:
        assert 8 * reps[0] * reps[1] * reps[2] // max(reps) * (max(reps) - 1) < n


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="warp"):
        bench_md._our_calculators(None, "cpu", ("eager", "warp"))


def test_largest_cell_stops_each_implementation_at_its_first_oom(monkeypatch):
    original = calc_mod.CHGNetCalculator.calculate

    def calculate(self, atoms=None, properties=("energy",), system_changes=calc_mod.all_changes):
        if len(atoms) > 40:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, atoms, properties, system_changes)

    monkeypatch.setattr(calc_mod.CHGNetCalculator, "calculate", calculate)
    seen = []
    rows = bench_md.largest_cell("cpu", start=8, limit=1000, reference=False,
                                 on_row=lambda r: seen.append(len(r)))
    assert [(r["n_atoms"], r["status"]) for r in rows] == [(8, "ok"), (16, "ok"), (32, "ok"),
                                                           (64, "oom")]
    assert seen == [1, 2, 3, 4]
    assert "ours 32 atoms" in bench_md.format_cell_table(rows)


def test_largest_cell_reraises_other_errors(monkeypatch):
    def calculate(self, *args, **kwargs):
        raise RuntimeError("index out of range")

    monkeypatch.setattr(calc_mod.CHGNetCalculator, "calculate", calculate)
    with pytest.raises(RuntimeError, match="index out of range"):
        bench_md.largest_cell("cpu", start=8, limit=8, reference=False)


def test_main_max_cell_writes_the_record(tmp_path):
    out = tmp_path / "cell.json"
    assert bench_md.main(["--device", "cpu", "--max-cell", "--no-reference", "--max-cell-start", "8",
                          "--max-cell-limit", "16", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [r["n_atoms"] for r in record["rows"]] == [8, 16]
    assert all(r["status"] == "ok" for r in record["rows"])
    assert "partial" not in record["settings"]


def test_md_bench_variant_columns_and_cpu_skips_cuda_graphs(monkeypatch, capsys):
    # one tiny structure keeps this fast; the cudagraph variant needs CUDA and is skipped
    monkeypatch.setattr(bench_md, "md_structures",
                        lambda large=None: {"Si-8": bench_md.si_supercell(8)})
    rows = bench_md.run_md_bench("cpu", repeats=1, warmup=0, reference=False,
                                 variants=("eager", "cudagraph"))
    assert "CUDA graphs need a CUDA device" in capsys.readouterr().err
    assert len(rows) == 1 and rows[0]["n_atoms"] == 8 and "cudagraph_ms" not in rows[0]
    table = bench_md.format_md_table([{**rows[0], "compiled_ms": 1.0, "ratio_compiled": None}])
    assert "compiled ms/step" in table and "cudagraph" not in table


def test_partial_saver_rewrites_the_record_marked_partial(tmp_path):
    assert partial_saver(None, {}, {}, 0.0) is None
    path = tmp_path / "r.json"
    save = partial_saver(path, {"device": "cpu"}, {"repeats": 2}, 0.0)
    save([{"case": "a"}])
    save([{"case": "a"}, {"case": "b"}])
    record = json.loads(path.read_text())
    assert record["settings"] == {"repeats": 2, "partial": True}
    assert [r["case"] for r in record["rows"]] == ["a", "b"]
