"""The performance regression gate compares ratios to the reference, not absolute times."""

from __future__ import annotations

import json

from fastchgnet.bench.gate import compare, main, ratios_of


def _run(tmp_path, name, ratios, seconds=1.0):
    doc = {"benchmarks": [{"group": g, "name": f"test[{g}-{impl}]", "stats": {"median": seconds},
                           "extra_info": {"impl": impl, "ratio": r}}
                          for g, r in ratios.items() for impl in ("ours", "chgnet")]}
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_ratios_of_reads_one_ratio_per_group_and_skips_missing():
    doc = {"benchmarks": [{"group": "a", "extra_info": {"ratio": 3.0}},
                          {"group": "b", "extra_info": {}},
                          {"group": "c", "extra_info": {"ratio": float("nan")}}]}
    assert ratios_of(doc) == {"a": 3.0}


def test_ratios_of_reads_peer_ratios_as_cases_of_their_own():
    doc = {"benchmarks": [{"group": "peers md Si-64 1t",
                           "extra_info": {"ratio": 2.5, "peer_ratios": {"matgl": 1.3, "x": None}}}]}
    assert ratios_of(doc) == {"peers md Si-64 1t": 2.5, "peers md Si-64 1t vs matgl": 1.3}


def test_compare_fails_only_beyond_the_margin_and_names_the_case():
    base = {"md LiMnO2": 4.0, "train b8": 3.0, "gone": 2.0}
    failures, notes = compare({"md LiMnO2": 3.1, "train b8": 2.0, "new": 1.5}, base, margin=0.25)
    assert len(failures) == 1 and failures[0].startswith("train b8: ratio 2.00x, baseline 3.00x")
    assert any("gone" in n for n in notes) and any("new" in n for n in notes)


def test_update_then_check(tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    assert main(["update", str(_run(tmp_path, "r0.json", {"x": 4.0, "y": 2.0})),
                 "--baseline", str(baseline)]) == 0
    assert json.loads(baseline.read_text())["ratios"] == {"x": 4.0, "y": 2.0}
    # slower absolute times but the same ratios: passes
    assert main(["check", str(_run(tmp_path, "r1.json", {"x": 3.9, "y": 2.1}, seconds=9.0)),
                 "--baseline", str(baseline)]) == 0
    assert main(["check", str(_run(tmp_path, "r2.json", {"x": 2.0, "y": 2.0})),
                 "--baseline", str(baseline)]) == 1
    assert "REGRESSION x: ratio 2.00x, baseline 4.00x" in capsys.readouterr().out


def test_a_baseline_from_another_processor_is_named(tmp_path, capsys):
    """"AMD EPYC" spans generations whose ratios differ: the gate says when the run's processor
    (family/model, recorded by benchmarks/conftest.py) is not the baseline's."""
    def run(name, model):
        path = _run(tmp_path, name, {"x": 4.0})
        doc = json.loads(path.read_text())
        doc["machine_info"] = {"cpu": {"brand_raw": "AMD EPYC", "count": 2},
                               "fastchgnet_cpu_model": model}
        path.write_text(json.dumps(doc))
        return path

    baseline = tmp_path / "baseline.json"
    assert main(["update", str(run("a.json", "family 26 model 2")), "--baseline", str(baseline)]) == 0
    assert json.loads(baseline.read_text())["machine"]["cpu_model"] == "family 26 model 2"
    capsys.readouterr()
    assert main(["check", str(run("b.json", "family 26 model 2")), "--baseline", str(baseline)]) == 0
    assert "ratios differ between processors" not in capsys.readouterr().out
    assert main(["check", str(run("c.json", "family 25 model 17")), "--baseline", str(baseline)]) == 0
    out = capsys.readouterr().out
    assert "family 26 model 2" in out and "family 25 model 17" in out and "BENCH_BASELINE" in out
