"""The ``fastchgnet`` command (also ``python -m fastchgnet``).

Subcommands are registered in :data:`COMMANDS`: each entry is a function that adds its own
sub-parser and sets ``func`` (the handler, called with the parsed ``argparse.Namespace`` and
returning an exit code). To add a command (train, evaluate, relax, md, ...), write
``_add_<name>(subparsers)`` and append it to ``COMMANDS`` — or call :func:`register_command`
from another module before :func:`main` runs. Heavy imports happen inside the handlers so that
``fastchgnet --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

AddCommand = Callable[["argparse._SubParsersAction"], None]


# ----------------------------------------------------------------------------------------------
# shared helpers


def _add_device_arg(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--device", default=default,
                   help="cpu, cuda, cuda:N or auto (cuda when available) [default: %(default)s]")


def _device(name: str) -> str:
    from fastchgnet.bench import resolve_device

    return resolve_device(name)


def read_structures(path: str) -> list[tuple[str, Any]]:
    """``(label, structure)`` pairs of one file: pymatgen ``Structure.from_file`` first, then
    ``ase.io.read`` (every frame of a multi-frame file)."""
    import warnings

    errors = []
    try:
        from pymatgen.core import Structure

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [(path, Structure.from_file(path))]
    except Exception as exc:  # unknown format for pymatgen: try ASE
        errors.append(f"pymatgen: {exc}")
    try:
        import ase.io

        frames = ase.io.read(path, index=":")
        if not isinstance(frames, list):
            frames = [frames]
        if len(frames) == 1:
            return [(path, frames[0])]
        return [(f"{path}@{i}", a) for i, a in enumerate(frames)]
    except Exception as exc:
        errors.append(f"ase: {exc}")
    raise ValueError(f"cannot read {path}: " + "; ".join(errors))


def _formula(s: Any) -> str:
    if hasattr(s, "composition"):
        return s.composition.reduced_formula
    if hasattr(s, "get_chemical_formula"):
        return s.get_chemical_formula(mode="metal", empirical=True)
    return "?"


def summarize(pred: dict) -> dict[str, float | None]:
    """Energy per atom, max |F|, pressure (GPa, positive = compressed) and mean/max |m|."""
    import numpy as np

    out: dict[str, float | None] = {"e": float(pred["e"]) if "e" in pred else None,
                                    "fmax": None, "pressure": None, "m_mean": None, "m_max": None}
    if "f" in pred and len(pred["f"]):
        out["fmax"] = float(np.linalg.norm(pred["f"], axis=1).max())
    if "s" in pred:
        # stress is positive-tensile (the reference's sign): pressure = -trace / 3
        out["pressure"] = float(-np.trace(pred["s"]) / 3.0)
    if "m" in pred and len(pred["m"]):
        m = np.abs(np.asarray(pred["m"]))
        out["m_mean"], out["m_max"] = float(m.mean()), float(m.max())
    return out


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _prediction_table(labels: list[str], structures: list, preds: list[dict]) -> str:
    from fastchgnet.bench import text_table

    rows = []
    for label, s, p in zip(labels, structures, preds):
        sm = summarize(p)
        rows.append([label, _formula(s), str(len(s)), _f(sm["e"], ".5f"), _f(sm["fmax"], ".4f"),
                     _f(sm["pressure"], ".3f"), _f(sm["m_mean"], ".3f")])
    return text_table(["structure", "formula", "atoms", "e eV/atom", "max|F| eV/A", "P GPa", "mean|m| muB"],
                  rows)


def _load(model: str, device: str):
    import fastchgnet

    return fastchgnet.load_model(model, device=device)


# ----------------------------------------------------------------------------------------------
# bench


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time fastchgnet against the reference chgnet, side by side",
                       description="Time graph construction and prediction, ours vs chgnet, "
                                   "interleaved in one process; prints medians and ref/ours ratios.")
    _add_device_arg(p)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per case [%(default)s]")
    p.add_argument("--warmup", type=int, default=1, help="warm-up calls per case [%(default)s]")
    p.add_argument("--quick", action="store_true", help="fewer repeats and cases")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own setting)")
    p.add_argument("--json", metavar="PATH", help="save the environment and rows as JSON")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from fastchgnet.bench import main_bench

    main_bench(device=args.device, repeats=args.repeats, warmup=args.warmup, quick=args.quick,
               json_path=args.json, threads=args.threads)
    return 0


# ----------------------------------------------------------------------------------------------
# predict


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="energy, forces, stress and magmoms of structure files",
                       description="Predict with a CHGNet model for each structure file "
                                   "(CIF, POSCAR, extxyz, ... via pymatgen or ASE).")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--task", default="efsm", help="e, ef, efs, efsm, em, ... [%(default)s]")
    p.add_argument("--model", default="0.3.0",
                   help="pretrained name (0.3.0, 0.2.0, r2scan) or checkpoint path [%(default)s]")
    _add_device_arg(p)
    p.add_argument("--batch-size", type=int, default=16, help="structures per batch [%(default)s]")
    p.add_argument("--json", metavar="OUT", help="write all predictions (full arrays) as JSON")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    labels: list[str] = []
    structures: list = []
    for path in args.files:
        for label, s in read_structures(path):
            labels.append(label)
            structures.append(s)
    model = _load(args.model, _device(args.device))
    preds = model.predict(structures, task=args.task, batch_size=args.batch_size, ids=labels)
    print(_prediction_table(labels, structures, preds))
    if args.json:
        import json
        from pathlib import Path

        records = []
        for label, s, p in zip(labels, structures, preds):
            records.append({"file": label, "formula": _formula(s), "n_atoms": len(s),
                            **{k: v.tolist() for k, v in p.items()}, "summary": summarize(p)})
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": str(args.model), "task": args.task,
                                   "units": {"e": "eV/atom", "f": "eV/A", "s": "GPa (positive = tensile)",
                                             "m": "muB"},
                                   "predictions": records}, indent=1) + "\n")
        print(f"# saved {out}")
    return 0


# ----------------------------------------------------------------------------------------------
# demo


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train on the built-in dataset for a few minutes (make demo)",
                       description="Train the exact CHGNet architecture from scratch on the built-in "
                                   "dataset (labels distilled from CHGNet 0.3.0) for a few minutes, "
                                   "then print the test MAE table and where the checkpoint and plots "
                                   "are. --predict instead predicts built-in crystals with the 0.3.0 "
                                   "weights and runs a quick benchmark against chgnet.")
    _add_device_arg(p)
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
    p.set_defaults(func=_run_demo)


# a few minutes on a 2-core CPU (the full architecture trained 14-15 structures/s at batch 16 here)
DEMO = {"epochs": 3, "limit": 1000, "batch_size": 16, "lr": 2e-3}


def _run_demo(args: argparse.Namespace) -> int:
    if args.predict:
        return _run_demo_predict(args)
    import time

    from fastchgnet.train.trainer import TrainConfig, train

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


def _run_demo_predict(args: argparse.Namespace) -> int:
    import time

    from fastchgnet.data.prototypes import demo_structures

    device = _device(args.device)
    structures = demo_structures()
    model = _load("0.3.0", device)
    t0 = time.perf_counter()
    preds = model.predict(structures, task="efsm", batch_size=16)
    dt = time.perf_counter() - t0
    labels = [f"demo[{i}]" for i in range(len(structures))]
    print(f"# CHGNet 0.3.0 ({model.n_params:,} parameters) on {device}: "
          f"{len(structures)} structures, {sum(len(s) for s in structures)} atoms in {dt * 1e3:.0f} ms")
    print(_prediction_table(labels, structures, preds))
    if not args.no_bench:
        from fastchgnet.bench import main_bench

        print()
        main_bench(device=device, quick=True)
    return 0


# ----------------------------------------------------------------------------------------------
# train / evaluate


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="PATH", default=None,
                   help="dataset file (MPtrj JSON, extxyz, ASE db, mlearn JSON, ...); "
                        "default: the built-in dataset")
    p.add_argument("--format", default="auto",
                   choices=["auto", "mptrj", "extxyz", "asedb", "mlearn", "ase"],
                   help="dataset format [%(default)s: by extension and content]")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="graph cache root [$FASTCHGNET_CACHE or ~/.cache/fastchgnet/graphs]")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip malformed entries (counted in the log) instead of stopping")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (default: on the built-in dataset)",
                       description="Train a CHGNet-class model with the efsm Huber loss, Adam and a "
                                   "cosine schedule; writes checkpoints, metrics.csv, test.json "
                                   "and parity plots to --out.")
    _add_data_args(p)
    p.add_argument("--val-data", metavar="PATH", help="validation file (instead of the random split)")
    p.add_argument("--test-data", metavar="PATH", help="test file (instead of the random split)")
    p.add_argument("--split", default="0.9,0.05,0.05", help="train,val,test fractions [%(default)s]")
    p.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    p.add_argument("--model", default="exact", help="model type [%(default)s]")
    p.add_argument("--force-head", default=None, choices=["direct", "pair", "pair+direct"],
                   help="force head of a new heads model (docs/models.md) [direct]")
    p.add_argument("--stress-head", default=None, choices=["virial", "lattice"],
                   help="stress head of a new heads model [virial]")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="fine-tune from these weights: 0.3.0 or a checkpoint")
    p.add_argument("--freeze", default="", metavar="GROUPS",
                   help="comma-separated parameter groups to keep fixed: embedding, block0..blockN, "
                        "magmom, readout, or parameter-name prefixes")
    p.add_argument("--refit-atomref", action="store_true",
                   help="with --init: refit the per-element reference energies on the training set")
    p.add_argument("--epochs", type=int, default=10, help="total number of epochs [%(default)s]")
    p.add_argument("--batch-size", type=int, default=16,
                   help="structures per optimiser step, the GLOBAL batch: under torchrun it is "
                        "split over all ranks (about batch/ranks each) [%(default)s]")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate [global batch_size / 128 * 3e-4]")
    p.add_argument("--min-lr-ratio", type=float, default=0.01,
                   help="cosine schedule ends at this fraction of --lr [%(default)s]")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps [%(default)s]")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this")
    p.add_argument("--ema-decay", type=float, default=None, metavar="DECAY",
                   help="validate and save (best.pt) an exponential moving average of the weights "
                        "with this decay, e.g. 0.99 [off]")
    p.add_argument("--loss", default="huber", choices=["huber", "mse", "mae"])
    p.add_argument("--delta", type=float, default=0.1, help="Huber delta [%(default)s]")
    p.add_argument("--weights", default="2,1.5,0.1,0.1", metavar="E,F,S,M",
                   help="loss prefactors of energy, forces, stress, magmom [%(default)s]")
    p.add_argument("--stage-two-start", type=int, default=None, metavar="EPOCHS",
                   help="after this many epochs, switch to --stage-two-weights and --stage-two-lr "
                        "(best.pt is then the best model of stage two) [off]")
    p.add_argument("--stage-two-weights", default=None, metavar="E,F,S,M",
                   help="loss prefactors of stage two [those of --weights]")
    p.add_argument("--stage-two-lr", type=float, default=None,
                   help="constant learning rate of stage two [the cosine schedule goes on]")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp64", "tf32"],
                   help="fp32 (default), fp64, or tf32 matmuls on CUDA")
    p.add_argument("--seed", type=int, default=0)
    _add_device_arg(p)
    p.add_argument("--out", default="runs/train", help="run directory [%(default)s]")
    p.add_argument("--resume", action="store_true", help="continue the run in --out up to --epochs")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes [0 on CPU, 4 on CUDA]")
    p.add_argument("--cache-workers", type=int, default=None,
                   help="processes that build the graph cache [all CPUs]")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also write last.pt every STEPS steps (0: at epoch ends only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="no parity plots")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the training forward of a heads model (--model heads); "
                        "BACKEND defaults to inductor")
    p.add_argument("--log-every", type=int, default=0, metavar="STEPS",
                   help="log the loss and the load CV every STEPS steps (0: per epoch only)")
    d = p.add_argument_group("distributed (torchrun --nproc_per_node N -m fastchgnet train ...)")
    d.add_argument("--balance", default="greedy", choices=["none", "paper", "greedy"],
                   help="split of every global batch over the ranks by cost (atoms + bonds + "
                        "angles): none, paper (smallest + largest in turn), greedy [%(default)s]")
    d.add_argument("--bucket-mb", type=float, default=None,
                   help="DDP gradient bucket size in MiB [torch default: 1 MiB first bucket, "
                        "then 25 MiB]")
    d.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="a collective that waits longer (a dead or hung rank) stops the job "
                        "[%(default)s]")
    p.set_defaults(func=_run_train)


def floats_arg(text: str, n: int, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{what} must be {n} comma-separated numbers, got {text!r}") from None
    if len(vals) != n:
        raise ValueError(f"{what} must be {n} comma-separated numbers, got {text!r}")
    return vals


def _run_train(args: argparse.Namespace) -> int:
    from fastchgnet.train.trainer import TrainConfig, train

    e, f, s, m = floats_arg(args.weights, 4, "--weights")
    two = (dict(zip("efsm", floats_arg(args.stage_two_weights, 4, "--stage-two-weights")))
           if args.stage_two_weights is not None else None)
    arch = {k: v for k, v in (("force_head", args.force_head), ("stress_head", args.stress_head))
            if v is not None}
    if arch and args.model != "heads":
        raise ValueError(f"--force-head and --stress-head are options of --model heads, not "
                         f"{args.model!r}")
    cfg = TrainConfig(
        model_config=arch,
        data=args.data, format=args.format, val_data=args.val_data, test_data=args.test_data,
        split=tuple(floats_arg(args.split, 3, "--split")), limit=args.limit, model=args.model,
        init=args.init, freeze=tuple(x for x in args.freeze.split(",") if x),
        refit_atom_ref=args.refit_atomref, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, ema_decay=args.ema_decay, loss=args.loss, delta=args.delta,
        prefactors={"e": e, "f": f, "s": s, "m": m}, stage_two_start=args.stage_two_start,
        stage_two_prefactors=two, stage_two_lr=args.stage_two_lr, precision=args.precision,
        seed=args.seed, device=args.device, out=args.out, cache=args.cache, workers=args.workers,
        cache_workers=args.cache_workers,
        skip_bad=args.skip_bad, checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress, plots=not args.no_plots, resume=args.resume,
        balance=args.balance, bucket_mb=args.bucket_mb, dist_timeout=args.dist_timeout,
        log_every=args.log_every, compile=args.compile)
    from fastchgnet.train.distributed import DistributedTrainingError

    try:
        train(cfg)
    except DistributedTrainingError as exc:
        print(f"fastchgnet train: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="MAEs of a checkpoint on a dataset",
                       description="Evaluate a model (0.3.0 or a checkpoint) on a dataset: MAE table, "
                                   "a JSON report and parity plots.")
    p.add_argument("model", help="0.3.0 or a checkpoint path (e.g. runs/train/best.pt)")
    _add_data_args(p)
    p.add_argument("--limit", type=int, default=None, help="only the first N samples")
    p.add_argument("--batch-size", type=int, default=32)
    _add_device_arg(p)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write eval.json and parity plots here")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from fastchgnet.train.data import GraphDataset
    from fastchgnet.train.report import mae_table, parity_plots
    from fastchgnet.train.trainer import _json_safe, evaluate, prepare_data

    device = _device(args.device)
    model = _load(args.model, device)
    cache = prepare_data(args.data, format=args.format, cache_root=args.cache, skip_bad=args.skip_bad,
                         atom_cutoff=model.config.atom_graph_cutoff,
                         bond_cutoff=model.config.bond_graph_cutoff)
    n = len(cache) if args.limit is None else min(args.limit, len(cache))
    ds = GraphDataset(cache, range(n))
    res = evaluate(model, ds, batch_size=args.batch_size, device=device, collect=args.out is not None)
    result = {"model": str(args.model), "data": args.data or "built-in", "n_test": res["n"],
              **{k: res[k] for k in ("loss", "e_mae", "f_mae", "s_mae", "m_mae")}}
    print(mae_table(result))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result["plots"] = [str(p) for p in parity_plots(res, out)]
        (out / "eval.json").write_text(json.dumps(_json_safe(result), indent=1) + "\n")
        print(f"# saved {out / 'eval.json'} and {len(result['plots'])} parity plots")
    return 0


# ----------------------------------------------------------------------------------------------
# parser

from fastchgnet.md.cli import COMMANDS as _MD_COMMANDS  # noqa: E402 (relax, md; light imports)

COMMANDS: list[AddCommand] = [_add_bench, _add_predict, _add_demo, _add_train, _add_evaluate,
                              *_MD_COMMANDS]


def register_command(add: AddCommand) -> None:
    """Add a subcommand: ``add(subparsers)`` must create a sub-parser and ``set_defaults(func=...)``."""
    if add not in COMMANDS:
        COMMANDS.append(add)


def build_parser() -> argparse.ArgumentParser:
    from fastchgnet import __version__

    parser = argparse.ArgumentParser(
        prog="fastchgnet", description="Fast CHGNet-class universal interatomic potentials.")
    parser.add_argument("--version", action="version", version=f"fastchgnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"fastchgnet {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
