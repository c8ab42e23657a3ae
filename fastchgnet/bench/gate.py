"""Performance regression gate: speed ratios against the reference, compared with a baseline.

Absolute times vary from machine to machine; the ratio ``chgnet median / ours median`` measured
side by side in one run varies much less. ``make bench`` saves pytest-benchmark JSON whose
``extra_info["ratio"]`` holds that ratio for every case run against the reference (see
``benchmarks/conftest.py``). This module compares those ratios with a committed baseline
(``benchmarks/baseline.json``):

* ``python -m fastchgnet.bench.gate check RESULTS.json [--baseline B] [--margin 0.25]`` fails
  (exit 1) when a case's ratio is below ``(1 - margin)`` × its baseline ratio, naming the case, its
  ratio and the baseline's; cases missing from either side are listed, not failed;
* ``python -m fastchgnet.bench.gate update RESULTS.json [--baseline B]`` writes the baseline from
  a run (commit it with the device and versions it records).

A case is a pytest-benchmark group (one per structure/batch/variant), which the ``ours`` and
``chgnet`` tests share. A case measured against further peers in the same run (the peers
benchmark: matgl's CHGNet) also stores ``extra_info["peer_ratios"] = {peer: peer median / ours
median}``; each becomes a case of its own, ``"<group> vs <peer>"``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["DEFAULT_BASELINE", "DEFAULT_MARGIN", "compare", "machine_note", "main", "ratios_of"]

DEFAULT_BASELINE = Path("benchmarks/baseline.json")
#: a ratio may fall by this fraction of its baseline before the gate fails: CPU ratios measured on
#: a shared 2-core machine moved by up to ~15 % between runs of the same code
DEFAULT_MARGIN = 0.25


def ratios_of(results: dict[str, Any]) -> dict[str, float]:
    """``{case: ratio}`` of a pytest-benchmark JSON document (one entry per group that has a
    finite ``extra_info["ratio"]``, and one per entry of ``extra_info["peer_ratios"]``)."""
    out: dict[str, float] = {}
    for bench in results.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        case = bench.get("group") or bench.get("name")
        if not case:
            continue
        peers = info.get("peer_ratios")
        named = {case: info.get("ratio")}
        if isinstance(peers, dict):
            named.update({f"{case} vs {peer}": r for peer, r in peers.items()})
        for name, ratio in named.items():
            if isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0:
                out[name] = float(ratio)
    return out


def machine_note(baseline: dict[str, Any], machine_info: dict[str, Any]) -> str | None:
    """A note when the run's processor is not the baseline's (same brand, another generation or
    vendor): ratios differ between processors, so a failure may be the machine, not the change."""
    here = (machine_info.get("cpu") or {}).get("brand_raw"), machine_info.get("fastchgnet_cpu_model")
    there = baseline.get("cpu"), baseline.get("cpu_model")
    if None in here or None in there or here == there:
        return None
    return (f"the baseline was measured on {there[0]} ({there[1]}), this run on {here[0]} "
            f"({here[1]}): ratios differ between processors; to judge a change on this machine, "
            "write a baseline here before the change (make bench, then make bench-baseline "
            "BENCH_BASELINE=/tmp/here.json) and check the change against it (make bench-check "
            "BENCH_BASELINE=/tmp/here.json)")


def compare(current: dict[str, float], baseline: dict[str, float],
            margin: float = DEFAULT_MARGIN) -> tuple[list[str], list[str]]:
    """(failures, notes): a failure per case whose ratio fell below ``(1 - margin)`` × baseline;
    notes for cases only on one side."""
    failures, notes = [], []
    for case in sorted(baseline):
        if case not in current:
            notes.append(f"{case}: in the baseline, not in this run")
            continue
        floor = (1.0 - margin) * baseline[case]
        if current[case] < floor:
            failures.append(f"{case}: ratio {current[case]:.2f}x, baseline {baseline[case]:.2f}x "
                            f"(allowed down to {floor:.2f}x, margin {margin:.0%})")
    notes += [f"{case}: new case, ratio {current[case]:.2f}x (not in the baseline)"
              for case in sorted(set(current) - set(baseline))]
    return failures, notes


def _load(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{what} {path} is not JSON: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastchgnet.bench.gate", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("check", "update"))
    p.add_argument("results", type=Path, help="pytest-benchmark JSON of a run (--benchmark-json)")
    p.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE,
                   help="the committed baseline [default: %(default)s]")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help="allowed fall of a ratio, as a fraction of the baseline [default: %(default)s]")
    args = p.parse_args(argv)
    results = _load(args.results, "results")
    current = ratios_of(results)
    if not current:
        print(f"{args.results}: no case with a ratio to the reference (was chgnet installed, and "
              "were the benchmarks run with --benchmark-only?)", file=sys.stderr)
        return 1
    if args.action == "update":
        machine = results.get("machine_info", {})
        doc = {"ratios": current, "margin": args.margin,
               "machine": {"python": machine.get("python_version"),
                           "cpu": (machine.get("cpu") or {}).get("brand_raw"),
                           "cpu_model": machine.get("fastchgnet_cpu_model"),
                           "cores": (machine.get("cpu") or {}).get("count")},
               "commit": results.get("commit_info", {}).get("id"),
               "datetime": results.get("datetime")}
        args.baseline.parent.mkdir(parents=True, exist_ok=True)
        args.baseline.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        print(f"baseline written: {args.baseline} ({len(current)} cases)")
        return 0
    base_doc = _load(args.baseline, "baseline")
    baseline = base_doc["ratios"]
    failures, notes = compare(current, baseline, args.margin)
    note = machine_note(base_doc.get("machine") or {}, results.get("machine_info") or {})
    if note:
        notes.insert(0, note)
    for line in notes:
        print(f"note: {line}")
    for line in failures:
        print(f"REGRESSION {line}")
    print(f"{len(current)} cases checked against {args.baseline}: "
          f"{len(failures)} regression(s)" + ("" if failures else ", all within the margin"))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
