"""DDP gradient bucket size (``--bucket-mb``) by measurement: training throughput of a real
``torchrun`` job for each bucket size, the sizes interleaved over the repeats.

Each run is ``torchrun --nproc_per_node N -m fastchgnet train`` for ``--epochs`` epochs on the same
data; the throughput is ``structures_per_s`` of the epochs after the first (the first one pays
for the process start and the warm-up). The default architecture is the 0.3.0 one: its 1.65 MB
of fp32 gradients make the buckets that matter.

    python scripts/ddp_buckets.py --data ../shared/data/mlearn/Si/training.json --limit 96 \
        --buckets default,0.25,0.5,25 --repeats 3 --json benchmarks/results/cpu-ddp-buckets.json
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastchgnet.bench.common import environment, save_record


def run_once(args: argparse.Namespace, bucket: str, out: Path, cache: Path) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.nproc}", "-m", "fastchgnet", "train", "--data", args.data,
           "--model", args.model, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--device", args.device, "--out", str(out), "--cache", str(cache), "--no-progress",
           "--no-plots", "--split", "0.9,0.1,0.0"]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    if bucket != "default":
        cmd += ["--bucket-mb", bucket]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"bucket {bucket}: torchrun failed ({res.returncode}):\n{res.stderr[-3000:]}")
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    return statistics.mean(float(r["structures_per_s"]) for r in rows[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--model", default="exact")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per rank [%(default)s]")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="global batch [%(default)s]")
    p.add_argument("--buckets", default="default,0.25,0.5,25")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is warm-up)")
    buckets = args.buckets.split(",")
    t0 = time.perf_counter()
    env = environment(args.device)
    results: dict[str, list[float]] = {b: [] for b in buckets}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for rep in range(args.repeats):
            for i, b in enumerate(buckets):
                thr = run_once(args, b, Path(tmp) / f"r{rep}-{i}", cache)
                results[b].append(thr)
                print(f"repeat {rep + 1}/{args.repeats}  bucket {b:>8}  {thr:.3f} structures/s", flush=True)
    rows = [{"bucket_mb": b, "structures_per_s": results[b],
             "median": statistics.median(results[b]),
             "spread": (max(results[b]) - min(results[b])) / statistics.median(results[b])}
            for b in buckets]
    base = rows[0]["median"]
    print("\n| bucket MiB | structures/s (median) | vs first | spread |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['bucket_mb']} | {r['median']:.3f} | {r['median'] / base:.3f} | {100 * r['spread']:.1f} % |")
    if args.json:
        save_record(args.json, env, vars(args), time.perf_counter() - t0, rows)


if __name__ == "__main__":
    main()
