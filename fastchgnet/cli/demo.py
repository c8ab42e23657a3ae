"""``fastchgnet demo``: train on the built-in dataset for a few minutes, or (``--predict``) predict
built-in crystals with the 0.3.0 weights and run a quick benchmark."""

from __future__ import annotations

import argparse
import time

from fastchgnet.cli.common import add_device_arg, prediction_table
from fastchgnet.device import resolve_device
from fastchgnet.model import load_model
from fastchgnet.train import TrainConfig, train

__all__ = ["DEMO", "add_demo"]

# a few minutes on a 2-core CPU (the full architecture trained 14-15 structures/s at batch 16 here)
DEMO = {"epochs": 3, "limit": 1000, "batch_size": 16, "lr": 2e-3}


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train on the built-in dataset for a few minutes (make demo)",
                       description="Train the exact CHGNet architecture from scratch on the built-in "
                                   "dataset (labels distilled from CHGNet 0.3.0) for a few minutes, "
                                   "then print the test MAE table and where the checkpoint and plots "
                                   "are. --predict instead predicts built-in crystals with the 0.3.0 "
                                   "weights and runs a quick benchmark against chgnet.")
    add_device_arg(p)
    p.add_argument("--epochs", type=int, default=DEMO["epochs"], help="[%(default)s]")
    p.add_argument("--limit", type=int, default=DEMO["limit"],
                   help="structures of the built-in dataset to use [%(default)s]")
    p.add_argument("--batch-size", type=int, default=DEMO["batch_size"], help="[%(default)s]")
    p.add_argument("--lr", type=float, default=DEMO["lr"], help="[%(default)s]")
    p.add_argument("--out", default=None, help="run directory [runs/demo-<date>-<time>]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--predict", action="store_true",
                   help="predict built-in crystals with the 0.3.0 weights instead of training")
    p.add_argument("--no-bench", action="store_true", help="with --predict: skip the quick benchmark")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    if args.predict:
        return run_demo_predict(args)
    out = args.out or time.strftime("runs/demo-%Y%m%d-%H%M%S")
    print(f"# fastchgnet demo: training the exact CHGNet architecture from scratch on "
          f"{args.limit} structures of the built-in dataset (labels distilled from CHGNet 0.3.0, "
          f"not DFT), {args.epochs} epochs; run directory {out}", flush=True)
    t0 = time.perf_counter()
    train(TrainConfig(epochs=args.epochs, limit=args.limit, batch_size=args.batch_size, lr=args.lr,
                      device=args.device, out=out, progress=not args.no_progress))
    print(f"# demo finished in {time.perf_counter() - t0:.0f} s. Next: "
          f"`fastchgnet predict --model {out}/best.pt FILE`, or train longer with "
          f"`fastchgnet train --out {out} --resume --epochs 10`.")
    return 0


def run_demo_predict(args: argparse.Namespace) -> int:
    from fastchgnet.data.prototypes import demo_structures  # lazy: pymatgen, see fastchgnet.cli

    device = resolve_device(args.device)
    structures = demo_structures()
    model = load_model("0.3.0", device=device)
    t0 = time.perf_counter()
    preds = model.predict(structures, task="efsm", batch_size=16)
    dt = time.perf_counter() - t0
    labels = [f"demo[{i}]" for i in range(len(structures))]
    print(f"# CHGNet 0.3.0 ({model.n_params:,} parameters) on {device}: "
          f"{len(structures)} structures, {sum(len(s) for s in structures)} atoms in {dt * 1e3:.0f} ms")
    print(prediction_table(labels, structures, preds))
    if not args.no_bench:
        from fastchgnet.bench import main_bench  # lazy: the harness, see fastchgnet.cli

        print()
        main_bench(device=device, quick=True)
    return 0
