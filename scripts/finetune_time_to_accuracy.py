"""Fine-tuning time-to-accuracy, fastchgnet's defaults vs chgnet's Trainer (issue 18, part 2).

For every seed and element, fine-tunes CHGNet 0.3.0 with both implementations back to back (the
order alternates), each in its own process (``python -m fastchgnet.bench.finetune``), and writes
one record with every run, the per-pair ratios and a summary over the seeds::

    python scripts/finetune_time_to_accuracy.py --elements Si Ge Li Mo --seeds 0 1 --threads 1 \
        --json benchmarks/results/finetune-mlearn-cpu.json
    python scripts/finetune_time_to_accuracy.py --table benchmarks/results/finetune-mlearn-cpu.json

The record is rewritten after every run (``"partial": true`` until the end), so a run stopped
early keeps what it measured. See :mod:`fastchgnet.bench.finetune` for what is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fastchgnet.bench.common import environment
from fastchgnet.bench.finetune import ELEMENTS, compare

ROOT = Path(__file__).resolve().parents[1]


def _load_note() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load average unavailable"
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


def _added(impl: str) -> dict[str, str]:
    """Ours runs in the environment the ``fastchgnet`` command gives itself (its OpenMP wait
    policy and allocator settings, where the user has not set them: fastchgnet.cli.launch);
    chgnet's Trainer in this process's environment, as a chgnet user's script would."""
    from fastchgnet.cli.launch import env_defaults

    return env_defaults(os.environ) if impl == "ours" else {}


def _env(impl: str) -> dict[str, str]:
    return {**os.environ, **_added(impl)}


def run_one(impl: str, element: str, seed: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    out = work / f"{element}-s{seed}-{impl}.json"
    cmd = [sys.executable, "-m", "fastchgnet.bench.finetune", "--impl", impl, "--element", element,
           "--seed", str(seed), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads), "--work", str(work / f"{element}-s{seed}-{impl}"),
           "--json", str(out)]
    if args.root:
        cmd += ["--root", args.root]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    load_before = _load_note()
    with open(work / f"{element}-s{seed}-{impl}.log", "w") as log:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                       env=_env(impl))
    return _result(out, load_before, impl)


def start_one(impl: str, element: str, seed: int, work: Path, args: argparse.Namespace
              ) -> tuple[subprocess.Popen, Path, str]:
    """:func:`run_one` started in the background; finish it with :func:`_result`."""
    out = work / f"{element}-s{seed}-{impl}.json"
    cmd = [sys.executable, "-m", "fastchgnet.bench.finetune", "--impl", impl, "--element", element,
           "--seed", str(seed), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads), "--work", str(work / f"{element}-s{seed}-{impl}"),
           "--json", str(out)] + (["--root", args.root] if args.root else []) \
        + (["--limit", str(args.limit)] if args.limit else [])
    log = open(work / f"{element}-s{seed}-{impl}.log", "w")
    # its own session: on a kernel with scheduler autogroups each run then gets the CPU share of
    # one session, the same for both runs of a pair whatever else shares the machine
    return (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, env=_env(impl)), out, _load_note())


def _result(out: Path, load_before: str, impl: str | None = None) -> dict[str, Any]:
    res = json.loads(out.read_text())
    res.pop("log", None)
    if impl is not None:
        res["env_added"] = _added(impl)
    res["load_before"] = load_before
    res["load_after"] = _load_note()
    return res


def summarize(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per element: mean, min and max over the seeds of every number of the table."""
    out: dict[str, Any] = {}
    for el in dict.fromkeys(p["element"] for p in pairs):
        rows = [p for p in pairs if p["element"] == el]
        stats: dict[str, Any] = {"seeds": [p["seed"] for p in rows]}
        for key, get in _COLUMNS.items():
            vals = [get(p) for p in rows]
            vals = [v for v in vals if v is not None]
            if vals:
                stats[key] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)),
                              "max": float(np.max(vals))}
        out[el] = stats
    return out


_COLUMNS = {
    "ours_e": lambda p: p["ours"]["test"]["e_mae"], "ref_e": lambda p: p["chgnet"]["test"]["e_mae"],
    "ours_f": lambda p: p["ours"]["test"]["f_mae"], "ref_f": lambda p: p["chgnet"]["test"]["f_mae"],
    "ours_s": lambda p: p["ours"]["test"]["s_mae"], "ref_s": lambda p: p["chgnet"]["test"]["s_mae"],
    "ours_wall": lambda p: p["ours"]["wall_s"], "ref_wall": lambda p: p["chgnet"]["wall_s"],
    "ours_tt": lambda p: p["compare"]["ours_time_to_target_s"],
    "ref_tt": lambda p: p["compare"]["ref_time_to_target_s"],
    "e_ratio": lambda p: p["compare"]["e_ratio"], "f_ratio": lambda p: p["compare"]["f_ratio"],
    "wall_ratio": lambda p: p["compare"]["wall_ratio"],
    "ours_cpu": lambda p: p["ours"].get("cpu_s"), "ref_cpu": lambda p: p["chgnet"].get("cpu_s"),
    "cpu_ratio": lambda p: p["compare"].get("cpu_ratio"),
}


def table(pairs: list[dict[str, Any]]) -> str:
    head = ("| element | seed | E ours / chgnet (meV/atom) | F ours / chgnet (meV/Å) | "
            "S ours / chgnet (GPa) | wall ours / chgnet (s) | to chgnet's final val E (s) | "
            "E ratio | F ratio | wall ratio | CPU ours / chgnet (s) | CPU ratio |")
    lines = [head, "|" + "---|" * 12]
    for p in pairs:
        o, r, c = p["ours"], p["chgnet"], p["compare"]
        tt = c["ours_time_to_target_s"]
        lines.append(
            f"| {p['element']} | {p['seed']} | {o['test']['e_mae']:.1f} / {r['test']['e_mae']:.1f} | "
            f"{o['test']['f_mae']:.1f} / {r['test']['f_mae']:.1f} | "
            f"{o['test']['s_mae']:.3f} / {r['test']['s_mae']:.3f} | {o['wall_s']:.0f} / {r['wall_s']:.0f} | "
            f"{'never' if tt is None else f'{tt:.0f}'} / {c['ref_time_to_target_s']:.0f} | "
            f"{c['e_ratio']:.2f} | {c['f_ratio']:.2f} | {c['wall_ratio']:.2f} | "
            + (f"{o['cpu_s']:.0f} / {r['cpu_s']:.0f} | {c['cpu_ratio']:.2f} |" if "cpu_ratio" in c
               else "– | – |"))
    return "\n".join(lines)


def summary_table(summary: dict[str, Any]) -> str:
    """Per element: the mean over the seeds, and the range (min-max) in brackets."""
    def cell(st: dict[str, Any], key: str, fmt: str) -> str:
        v = st.get(key)
        if v is None:
            return "never"
        return f"{v['mean']:{fmt}} ({v['min']:{fmt}}–{v['max']:{fmt}})"

    lines = ["| element | seeds | E ours | E chgnet | F ours | F chgnet | wall ours (s) | "
             "wall chgnet (s) | E ratio | F ratio | wall ratio |", "|" + "---|" * 11]
    for el, st in summary.items():
        lines.append(
            f"| {el} | {len(st['seeds'])} | {cell(st, 'ours_e', '.1f')} | {cell(st, 'ref_e', '.1f')} | "
            f"{cell(st, 'ours_f', '.1f')} | {cell(st, 'ref_f', '.1f')} | {cell(st, 'ours_wall', '.0f')} | "
            f"{cell(st, 'ref_wall', '.0f')} | {cell(st, 'e_ratio', '.2f')} | {cell(st, 'f_ratio', '.2f')} | "
            f"{cell(st, 'wall_ratio', '.2f')} |")
    return "\n".join(lines)


def _save(path: Path | None, record: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--elements", nargs="+", default=list(ELEMENTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch_threads_default())
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--parallel", type=int, default=0, metavar="N",
                   help="run N pairs at a time, the two runs of each pair together (0: one run "
                        "at a time)")
    p.add_argument("--root", default=None)
    p.add_argument("--work", default=None, help="folder for the runs [a temporary one]")
    p.add_argument("--json", default=str(ROOT / "benchmarks/results/finetune-mlearn-cpu.json"))
    p.add_argument("--table", metavar="RECORD", default=None, help="only print the table of a record")
    p.add_argument("--collect", nargs="+", metavar="WORK", default=None,
                   help="only build the record (--json) from the finished runs (<El>-s<seed>-<impl>"
                        ".json) in these run folders, e.g. of several invocations run side by side")
    a = p.parse_args(argv)
    if a.collect:
        return collect(a)
    if a.table:
        rec = json.loads(Path(a.table).read_text())
        print(table(rec["pairs"]))
        print()
        print(summary_table(summarize(rec["pairs"])))
        return 0
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="finetune-tta-"))
    work.mkdir(parents=True, exist_ok=True)
    env = environment("cpu")
    env["torch_threads"] = a.threads
    record: dict[str, Any] = {
        "what": "fine-tune CHGNet 0.3.0 on mlearn training.json (seeded 90/10 train/val split, the "
                "same frames for both), test on test.json: fastchgnet train --init 0.3.0 defaults vs "
                "chgnet's Trainer defaults (fastchgnet/bench/finetune.py)",
        "command": "python scripts/finetune_time_to_accuracy.py " + " ".join(argv or sys.argv[1:]),
        "environment": env, "env_ours": "the fastchgnet command's own additions "
                                          "(fastchgnet.cli.launch.env_defaults), per pair",
        "settings": {"epochs": a.epochs, "batch_size": a.batch_size,
                                         "threads": a.threads, "elements": a.elements,
                                         "seeds": a.seeds},
        "units": {"e_mae": "meV/atom", "f_mae": "meV/A", "s_mae": "GPa", "wall_s": "s"},
        "partial": True, "pairs": []}
    t0 = time.perf_counter()
    jobs = [(seed, el) for seed in a.seeds for el in a.elements]
    record["settings"]["parallel_pairs"] = a.parallel
    record["settings"]["mode"] = (
        "sequential: the two runs of a pair back to back, alternating which goes first"
        if a.parallel == 0 else
        f"concurrent: {a.parallel} pair(s) at a time, the two runs of a pair started together, each "
        "in its own session (scheduler autogroup): the same background load for both; the run that "
        "ends first frees the CPU for the other, which favours the slower one")

    def add(el: str, seed: int, order: tuple[str, ...], res: dict[str, Any]) -> None:
        pair = {"element": el, "seed": seed, "order": list(order), "ours": res["ours"],
                "chgnet": res["chgnet"], "compare": compare(res["ours"], res["chgnet"])}
        record["pairs"].append(pair)
        record["summary"] = summarize(record["pairs"])
        record["wall_s"] = time.perf_counter() - t0
        _save(Path(a.json) if a.json else None, record)
        print(table([pair]).splitlines()[-1], flush=True)

    if a.parallel == 0:
        for k, (seed, el) in enumerate(jobs):
            order = ("ours", "chgnet") if k % 2 == 0 else ("chgnet", "ours")
            add(el, seed, order, {impl: run_one(impl, el, seed, work, a) for impl in order})
    for i in range(0, len(jobs) if a.parallel else 0, max(a.parallel, 1)):
        wave = jobs[i:i + a.parallel]
        started = {(seed, el, impl): start_one(impl, el, seed, work, a)
                   for seed, el in wave for impl in ("chgnet", "ours")}
        for (seed, el, impl), (proc, _, _) in started.items():
            if proc.wait() != 0:
                raise RuntimeError(f"{el} seed {seed} {impl} failed: see {work}/{el}-s{seed}-{impl}.log")
        for seed, el in wave:
            add(el, seed, ("together",), {impl: _result(*started[(seed, el, impl)][1:], impl)
                                          for impl in ("ours", "chgnet")})
    record["partial"] = False
    _save(Path(a.json) if a.json else None, record)
    print(table(record["pairs"]))
    return 0


def collect(a: argparse.Namespace) -> int:
    """The record of the pairs whose two runs both finished, from the run folders ``a.collect``."""
    pairs = []
    for seed in a.seeds:
        for el in a.elements:
            res = {}
            for impl in ("ours", "chgnet"):
                found = [Path(w) / f"{el}-s{seed}-{impl}.json" for w in a.collect
                         if (Path(w) / f"{el}-s{seed}-{impl}.json").is_file()]
                if found:
                    res[impl] = _result(found[-1], "n/a (collected)")
                    res[impl].pop("load_after")
            if len(res) == 2:
                pairs.append({"element": el, "seed": seed, "order": ["together"], **res,
                              "compare": compare(res["ours"], res["chgnet"])})
            else:
                print(f"# {el} seed {seed}: not finished ({sorted(res)} only)", file=sys.stderr)
    env = environment("cpu")
    env["torch_threads"] = a.threads
    record = {"what": "fine-tune CHGNet 0.3.0 on mlearn training.json (seeded 90/10 train/val split, "
                      "the same frames for both), test on test.json: fastchgnet train --init 0.3.0 "
                      "defaults vs chgnet's Trainer defaults (fastchgnet/bench/finetune.py)",
              "command": "python scripts/finetune_time_to_accuracy.py " + " ".join(sys.argv[1:]),
              "environment": env, "env_ours": "the fastchgnet command's own additions "
                                          "(fastchgnet.cli.launch.env_defaults), per pair",
        "settings": {"epochs": a.epochs, "batch_size": a.batch_size,
                                               "threads": a.threads, "elements": a.elements,
                                               "seeds": a.seeds, "collected_from": a.collect},
              "units": {"e_mae": "meV/atom", "f_mae": "meV/A", "s_mae": "GPa", "wall_s": "s"},
              "partial": len(pairs) < len(a.seeds) * len(a.elements), "pairs": pairs,
              "summary": summarize(pairs)}
    _save(Path(a.json), record)
    print(table(pairs))
    print()
    print(summary_table(record["summary"]))
    return 0


def torch_threads_default() -> int:
    import torch
    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
