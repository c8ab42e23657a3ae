"""``fastchgnet demo`` (what ``make demo`` runs).

By default: fine-tune the CHGNet 0.3.0 weights on a bundled real-DFT set (mlearn, Ge; see
``docs/mlearn.md``) for a few minutes on the CPU, with a progress bar, then print the zero-shot
and fine-tuned MAEs on that element's test set, the wall time and where the run's files are.
``--from-scratch`` trains the architecture from scratch on the built-in (distilled) dataset
instead; ``--predict`` predicts built-in crystals with the 0.3.0 weights and runs a quick
benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from fastchgnet.cli.common import add_device_arg, prediction_table
from fastchgnet.data.readers.bundled import mlearn_path, mlearn_sets
from fastchgnet.device import resolve_device
from fastchgnet.model import load_model
from fastchgnet.train import GraphDataset, TrainConfig, evaluate, prepare_data, train

__all__ = ["DEMO", "SCRATCH", "add_demo", "demo_table"]

# Fine-tuning 0.3.0 on mlearn Ge (217 training structures, 28 steps/epoch at batch 8): about
# 18 s per epoch on an idle 2-core CPU; the whole demo, start-up included, about 1.5 minutes.
DEMO = {"element": "Ge", "epochs": 3, "batch_size": 8}
# --from-scratch: a few minutes on a 2-core CPU (14-15 structures/s at batch 16 here)
SCRATCH = {"epochs": 3, "limit": 1000, "batch_size": 16, "lr": 2e-3}


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="fine-tune CHGNet 0.3.0 on bundled DFT data for a few minutes "
                                    "(make demo)",
                       description="Fine-tune the CHGNet 0.3.0 weights on the training set of a "
                                   "bundled mlearn element (real DFT: PBE, VASP) for a few minutes, "
                                   "then print the zero-shot and fine-tuned MAEs on its test set "
                                   "and where the checkpoint, metrics and parity plots are. "
                                   "--from-scratch instead trains the architecture from scratch on "
                                   "the built-in dataset (labels distilled from CHGNet 0.3.0); "
                                   "--predict predicts built-in crystals with the 0.3.0 weights "
                                   "and runs a quick benchmark against chgnet.")
    add_device_arg(p)
    p.add_argument("--element", default=DEMO["element"],
                   help="bundled mlearn element to fine-tune on (Ge, Li, Mo, Si) [%(default)s]")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"[{DEMO['epochs']}; --from-scratch {SCRATCH['epochs']}]")
    p.add_argument("--limit", type=int, default=None,
                   help=f"training structures to use [all; --from-scratch {SCRATCH['limit']}]")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"[{DEMO['batch_size']}; --from-scratch {SCRATCH['batch_size']}]")
    p.add_argument("--lr", type=float, default=None,
                   help=f"[the fine-tuning recipe's; --from-scratch {SCRATCH['lr']}]")
    p.add_argument("--out", default=None, help="run directory, a new one [runs/demo-<date>-<time>]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--from-scratch", action="store_true",
                   help="train from scratch on the built-in (distilled) dataset instead")
    p.add_argument("--predict", action="store_true",
                   help="predict built-in crystals with the 0.3.0 weights instead of training")
    p.add_argument("--no-bench", action="store_true", help="with --predict: skip the quick benchmark")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    if args.predict:
        return run_demo_predict(args)
    if args.from_scratch:
        return run_demo_scratch(args)
    return run_demo_finetune(args)


def _fresh_out(out: str | None) -> str:
    """``--out`` as given, unless it holds a run (FileExistsError before any work; the trainer
    would refuse it too), else a new ``runs/demo-<date>-<time>`` (``-2``, ``-3``, ... when that
    exists)."""
    if out:
        held = [n for n in ("last.pt", "demo.json") if (Path(out) / n).exists()]
        if held:
            raise FileExistsError(f"{out} already holds a run ({held[0]}): choose another --out, or "
                                  f"continue it with `fastchgnet train --out {out} --resume`")
        return out
    base = time.strftime("runs/demo-%Y%m%d-%H%M%S")
    path, k = base, 1
    while Path(path).exists():
        k += 1
        path = f"{base}-{k}"
    return path


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _ms(x: Any, scale: float = 1e3, digits: int = 1) -> str:
    return "–" if x is None or not math.isfinite(float(x)) else f"{float(x) * scale:.{digits}f}"


def demo_table(title: str, rows: list[tuple[str, dict[str, Any]]]) -> str:
    """The MAE table of the demo: one row per model (``e_mae`` eV/atom, ``f_mae`` eV/Å,
    ``s_mae`` GPa), energy and forces shown in meV."""
    head = ("energy meV/atom", "force meV/Å", "stress GPa")
    w = max([len(title)] + [len(name) for name, _ in rows])
    lines = [f"{title.ljust(w)}  " + "  ".join(h.rjust(15) for h in head)]
    for name, r in rows:
        cells = (_ms(r.get("e_mae")), _ms(r.get("f_mae"), digits=0), _ms(r.get("s_mae"), 1.0, 3))
        lines.append(f"{name.ljust(w)}  " + "  ".join(c.rjust(15) for c in cells))
    return "\n".join(lines)


def run_demo_finetune(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    train_path, test_path = mlearn_path(args.element, "train"), mlearn_path(args.element, "test")
    element = train_path.name.split("-")[0]
    epochs, batch = _pick(args.epochs, DEMO["epochs"]), _pick(args.batch_size, DEMO["batch_size"])
    out = _fresh_out(args.out)
    device = resolve_device(args.device)
    print(f"# fastchgnet demo: fine-tuning CHGNet 0.3.0 on the mlearn {element} DFT set (PBE, "
          f"VASP; bundled, docs/mlearn.md) for {_epochs(epochs)} at batch {batch}"
          + (f" on its first {args.limit} training structures" if args.limit else "")
          + f", on {device}; run directory {out}", flush=True)

    # zero-shot: the published 0.3.0 weights as they are, on the element's test set
    t0 = time.perf_counter()
    model = load_model("0.3.0", device=device)
    test_cache = prepare_data(str(test_path), atom_cutoff=model.config.atom_graph_cutoff,
                              bond_cutoff=model.config.bond_graph_cutoff,
                              log=lambda m: print(f"# {m}", flush=True))
    test_set = GraphDataset(test_cache)
    zero = evaluate(model, test_set, batch_size=2 * batch, device=device)
    del model
    t_zero = time.perf_counter() - t0
    print(f"# zero-shot CHGNet 0.3.0 on the {element} test set ({zero['n']} structures, "
          f"{t_zero:.0f} s): energy {_ms(zero['e_mae'])} meV/atom, forces {_ms(zero['f_mae'], digits=0)} "
          f"meV/Å, stress {_ms(zero['s_mae'], 1.0, 3)} GPa", flush=True)

    # fine-tune with the trainer's recipe for --init 0.3.0 (AtomRef refit, lr, cosine)
    t1 = time.perf_counter()
    tuned = train(TrainConfig(data=str(train_path), test_data=str(test_path), init="0.3.0",
                              epochs=epochs, batch_size=batch, limit=args.limit, lr=args.lr,
                              device=args.device, out=out, progress=not args.no_progress))
    t_tune = time.perf_counter() - t1
    wall = time.perf_counter() - t_start

    rows = [("CHGNet 0.3.0, zero-shot", zero),
            (f"fine-tuned, {_epochs(epochs)} (best.pt)", tuned)]
    table = demo_table(f"mlearn {element} test set, MAE ({zero['n']} structures)", rows)
    run = Path(out)
    plots = tuned.get("plots", [])
    report = {"element": element, "train_data": str(train_path), "test_data": str(test_path),
              "epochs": epochs, "batch_size": batch, "limit": args.limit, "n_test": zero["n"],
              "zero_shot": {k: zero[k] for k in ("e_mae", "f_mae", "s_mae")},
              "fine_tuned": {k: tuned.get(k) for k in ("e_mae", "f_mae", "s_mae")},
              "units": {"e_mae": "eV/atom", "f_mae": "eV/A", "s_mae": "GPa"},
              "seconds": {"zero_shot": t_zero, "fine_tuning": t_tune, "total": wall}}
    (run / "demo.json").write_text(json.dumps(report, indent=1) + "\n")
    print()
    print(table)
    print()
    print(f"wall time: {wall:.0f} s (zero-shot evaluation {t_zero:.0f} s, fine-tuning and test "
          f"{t_tune:.0f} s)")
    print(f"run folder:   {run}")
    print(f"checkpoint:   {run / 'best.pt'} (lowest validation loss; load_model or --model), "
          f"{run / 'last.pt'} (resume)")
    print(f"metrics:      {run / 'metrics.csv'} (per epoch), {run / 'test.json'}, {run / 'demo.json'}")
    if plots:
        print(f"parity plots: {', '.join(plots)}")
    print(f"# Next: `fastchgnet train --out {out} --resume --epochs {epochs + 5}` trains longer; "
          f"`fastchgnet evaluate {out}/best.pt --data mlearn:{element}:test`; other elements: "
          f"--element " + ", ".join(el for el, s in mlearn_sets().items() if "train" in s) + ".")
    return 0


def run_demo_scratch(args: argparse.Namespace) -> int:
    epochs, limit = _pick(args.epochs, SCRATCH["epochs"]), _pick(args.limit, SCRATCH["limit"])
    batch, lr = _pick(args.batch_size, SCRATCH["batch_size"]), _pick(args.lr, SCRATCH["lr"])
    out = _fresh_out(args.out)
    print(f"# fastchgnet demo: training the exact CHGNet architecture from scratch on "
          f"{limit} structures of the built-in dataset (labels distilled from CHGNet 0.3.0, "
          f"not DFT), {epochs} epochs; run directory {out}", flush=True)
    t0 = time.perf_counter()
    train(TrainConfig(epochs=epochs, limit=limit, batch_size=batch, lr=lr,
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
