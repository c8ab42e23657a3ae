"""fastchgnet vs matgl's CHGNet (0.3.0 weights ported) vs chgnet, side by side on the CPU.

Every case runs the three implementations interleaved round by round (A B C, C B A, ...) after a
warm-up round, with 1 and then 2 torch threads (see fastchgnet/bench/peers_run.py for the cases
and fastchgnet/bench/peers.py for the port). Prints a table and writes a JSON record.

    .venv/bin/python scripts/peers_speed.py                      # 1 and 2 threads, all cases
    .venv/bin/python scripts/peers_speed.py --threads 1 --cases md --repeats 5 --json /tmp/p.json

Needs matgl (pip install -e ".[peers]") and chgnet.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")

from fastchgnet.bench.common import _version, environment, format_environment, save_record  # noqa: E402
from fastchgnet.bench.peers_run import CASES, MD_SI_SIZES, format_peers_table, run_peers  # noqa: E402

DEFAULT_JSON = "benchmarks/results/cpu-peers-torch2.13.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2", help="torch thread counts, in order [%(default)s]")
    p.add_argument("--cases", default=",".join(CASES), help="md,predict,train [%(default)s]")
    p.add_argument("--si-sizes", default=",".join(map(str, MD_SI_SIZES)),
                   help="Si cells of the MD case (atoms) [%(default)s]")
    p.add_argument("--repeats", type=int, default=7,
                   help="timed rounds per case (512 atoms: a third, at least 3) [%(default)s]")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first [%(default)s]")
    p.add_argument("--json", default=DEFAULT_JSON, help="record to write [%(default)s]")
    p.add_argument("--note", default="", help="free text stored in the record (machine load)")
    p.add_argument("--compile", action="store_true",
                   help="ours compiled: the MD calculator (compile=True) and the training forward "
                        "(fastchgnet train --compile); compile time recorded")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",") if t]
    cases = [c for c in args.cases.split(",") if c]
    env = environment("cpu")
    env.update(matgl=_version("matgl"), torch_geometric=_version("torch_geometric"),
               omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
               loadavg_start=os.getloadavg())
    print(f"# {format_environment(env)}, matgl={env['matgl']}, "
          f"torch_geometric={env['torch_geometric']}, OMP_WAIT_POLICY={env['omp_wait_policy']}, "
          f"load average {env['loadavg_start'][0]:.1f}", flush=True)
    settings = {"threads": threads, "cases": cases, "repeats": args.repeats,
                "ours_compiled": args.compile,
                "warmup": args.warmup, "si_sizes": args.si_sizes, "note": args.note,
                "timing": "interleaved rounds A B C / C B A after warm-up; medians"}
    t0 = time.perf_counter()

    def save(rows: list[dict], partial: bool = True) -> None:
        env["loadavg_end"] = os.getloadavg()
        save_record(args.json, env, {**settings, "partial": partial}, time.perf_counter() - t0,
                    rows, sys.stderr)

    rows = run_peers(threads, cases, args.repeats, args.warmup,
                     si_sizes=[int(n) for n in args.si_sizes.split(",") if n],
                     progress=lambda s: print(f"# {s}", file=sys.stderr, flush=True),
                     on_row=save, compile_ours=args.compile)
    save(rows, partial=False)
    print(format_peers_table(rows))
    print("# ratios: peer median / fastchgnet median (> 1: fastchgnet faster); Δe: largest "
          "energy difference from chgnet (eV/atom)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
