"""``fastchgnet bench``: fastchgnet against the reference chgnet, side by side."""

from __future__ import annotations

import argparse

from fastchgnet.cli.common import add_device_arg

__all__ = ["add_bench"]


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time fastchgnet against the reference chgnet, side by side",
                       description="Time graph construction and prediction, ours vs chgnet, "
                                   "interleaved in one process; prints medians and ref/ours ratios.")
    add_device_arg(p)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per case [%(default)s]")
    p.add_argument("--warmup", type=int, default=1, help="warm-up calls per case [%(default)s]")
    p.add_argument("--quick", action="store_true", help="fewer repeats and cases")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own setting)")
    p.add_argument("--json", metavar="PATH", help="save the environment and rows as JSON")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from fastchgnet.bench import main_bench  # lazy: the harness, see fastchgnet.cli

    main_bench(device=args.device, repeats=args.repeats, warmup=args.warmup, quick=args.quick,
               json_path=args.json, threads=args.threads)
    return 0
