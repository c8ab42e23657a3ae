"""``fastchgnet train`` and ``fastchgnet evaluate``: training and evaluation from the shell."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastchgnet.cli.common import add_device_arg, floats_arg
from fastchgnet.device import resolve_device
from fastchgnet.model import load_model
from fastchgnet.train import (CheckpointWriteError, DistributedTrainingError, GraphDataset, TrainConfig,
                              TrainingDivergedError, evaluate, prepare_data, train)
from fastchgnet.train.config_file import config_fields, read_config_file
from fastchgnet.train.loss import DEFAULT_PREFACTORS, FINETUNE_PREFACTORS
from fastchgnet.train.report import json_safe, mae_table, parity_plots

__all__ = ["add_evaluate", "add_train"]


def add_data_args(p: argparse.ArgumentParser, train: bool = False) -> None:
    """``--data``, ``--format``, ``--cache``, ``--skip-bad``. ``train``: defaults of None (the
    value of TrainConfig applies), so that ``--resume`` can tell a flag given from a default."""
    p.add_argument("--data", metavar="PATH", default=None,
                   help="dataset file (MPtrj JSON, extxyz, ASE db, mlearn JSON, ...) or a bundled "
                        "set (mlearn:Ge, mlearn:Ge:test); default: the built-in dataset")
    p.add_argument("--format", default=None if train else "auto",
                   choices=["auto", "mptrj", "extxyz", "asedb", "mlearn", "ase"],
                   help="dataset format [auto: by extension and content]")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="graph cache root [$FASTCHGNET_CACHE or ~/.cache/fastchgnet/graphs]")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip malformed entries (counted in the log) instead of stopping")


_D = TrainConfig()  # the defaults shown in --help (the flags themselves default to None)


def _fmt_prefactors(pref: dict[str, float]) -> str:
    return ",".join(f"{v:g}" for v in pref.values())


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (default: on the built-in dataset)",
                       description="Train a CHGNet-class model with the efsm Huber loss, Adam and a "
                                   "cosine schedule; writes checkpoints, metrics.csv, test.json "
                                   "and parity plots to --out. With --resume, the options not "
                                   "given come from the run's last.pt; one given with another "
                                   "value than the run's is an error unless it may change on "
                                   "resume (docs/training.md).")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="options from a JSON (or, with PyYAML, YAML) file: any option of this "
                        "command as a key (batch-size: 8), or a run's config.json; flags given "
                        "here override it")
    add_data_args(p, train=True)
    p.add_argument("--val-data", metavar="PATH", help="validation file or bundled set (instead of the random split)")
    p.add_argument("--test-data", metavar="PATH", help="test file or bundled set, e.g. mlearn:Ge:test (instead of the random split)")
    p.add_argument("--split", default=None,
                   help=f"train,val,test fractions [{','.join(f'{x:g}' for x in _D.split)}]")
    p.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    p.add_argument("--model", default=None, help=f"model type [{_D.model}]")
    p.add_argument("--force-head", default=None, choices=["direct", "pair", "pair+direct"],
                   help="force head of a new heads model (docs/models.md) [direct]")
    p.add_argument("--stress-head", default=None, choices=["virial", "lattice"],
                   help="stress head of a new heads model [virial]")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="fine-tune from these weights: 0.3.0 or a checkpoint")
    p.add_argument("--freeze", default=None, metavar="GROUPS",
                   help="comma-separated parameter groups to keep fixed: embedding, block0..blockN, "
                        "magmom, readout, or parameter-name prefixes")
    p.add_argument("--refit-atomref", action=argparse.BooleanOptionalAction, default=None,
                   help="with --init: refit the per-element reference energies (AtomRef) to the "
                        "residuals of the initial model on the training set [on]")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"total number of epochs [{_D.epochs}; on --resume: the run's]")
    p.add_argument("--batch-size", type=int, default=None,
                   help="structures per optimiser step, the GLOBAL batch: under torchrun it is "
                        f"split over all ranks (about batch/ranks each) [{_D.batch_size}]")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate [with --init: 1e-3 (fine-tuning); from scratch: global "
                        "batch_size / 128 * 3e-4 (Eq. 14)]")
    p.add_argument("--min-lr-ratio", type=float, default=None,
                   help=f"cosine schedule ends at this fraction of --lr [{_D.min_lr_ratio}]")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help=f"linear warm-up steps [{_D.warmup_steps}]")
    p.add_argument("--weight-decay", type=float, default=None, help=f"[{_D.weight_decay}]")
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this")
    p.add_argument("--ema-decay", type=float, default=None, metavar="DECAY",
                   help="validate and save (best.pt) an exponential moving average of the weights "
                        "with this decay, e.g. 0.99 [off]")
    p.add_argument("--loss", default=None, choices=["huber", "mse", "mae"], help=f"[{_D.loss}]")
    p.add_argument("--delta", type=float, default=None, help=f"Huber delta [{_D.delta}]")
    p.add_argument("--weights", default=None, metavar="E,F,S,M",
                   help="loss prefactors of energy, forces, stress, magmom [with --init: "
                        f"{_fmt_prefactors(FINETUNE_PREFACTORS)}; from scratch: "
                        f"{_fmt_prefactors(DEFAULT_PREFACTORS)}]")
    p.add_argument("--stage-two-start", type=int, default=None, metavar="EPOCHS",
                   help="after this many epochs, switch to --stage-two-weights and --stage-two-lr "
                        "(best.pt is then the best model of stage two) [off]")
    p.add_argument("--stage-two-weights", default=None, metavar="E,F,S,M",
                   help="loss prefactors of stage two [those of --weights]")
    p.add_argument("--stage-two-lr", type=float, default=None,
                   help="constant learning rate of stage two [the cosine schedule goes on]")
    p.add_argument("--precision", default=None, choices=["fp32", "fp64", "tf32"],
                   help="fp32 (default), fp64, or tf32 matmuls on CUDA")
    p.add_argument("--seed", type=int, default=None, help=f"[{_D.seed}]")
    add_device_arg(p)
    p.add_argument("--out", default=None, help=f"run directory [{_D.out}]")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (written there, wherever it was started) up to "
                        "--epochs")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes [0 on CPU, 4 on CUDA]")
    p.add_argument("--cache-workers", type=int, default=None,
                   help="processes that build the graph cache [all CPUs]")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                   help="also write last.pt every STEPS steps (0: at epoch ends only) [0]")
    p.add_argument("--patience", type=int, default=None, metavar="EPOCHS",
                   help="stop early after EPOCHS epochs without a lower validation loss (best.pt "
                        "keeps the best) [off]")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write the epoch metrics as TensorBoard events to --out/tensorboard "
                        "(needs the tensorboard package)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="no parity plots")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the training forward from the first step (every model "
                        "on one process; --model heads in a distributed run); BACKEND defaults "
                        "to inductor; 'off' never compiles. Default 'auto': on one CPU process, "
                        "compile once the eager steps have taken 120 s if the rest of the run "
                        "would take 240 s more (a compilation takes about 2 minutes on a 2-core "
                        "CPU), and keep it only if faster [auto]")
    p.add_argument("--log-every", type=int, default=None, metavar="STEPS",
                   help="log the loss and the load CV every STEPS steps (0: per epoch only) [0]")
    d = p.add_argument_group("distributed (torchrun --nproc_per_node N -m fastchgnet train ...)")
    d.add_argument("--balance", default=None, choices=["none", "paper", "greedy"],
                   help="split of every global batch over the ranks by cost (atoms + bonds + "
                        f"angles): none, paper (smallest + largest in turn), greedy [{_D.balance}]")
    d.add_argument("--bucket-mb", type=float, default=None,
                   help="DDP gradient bucket size in MiB [torch default: 1 MiB first bucket, "
                        "then 25 MiB]")
    d.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="a collective that waits longer (a dead or hung rank) stops the job "
                        f"[{_D.dist_timeout:g}]")
    p.set_defaults(func=run_train)


# flags whose value goes unchanged into the TrainConfig field of the same name (None: not given)
_PLAIN = ("data", "format", "val_data", "test_data", "limit", "model", "init", "epochs",
          "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip",
          "ema_decay", "loss", "delta", "stage_two_start", "stage_two_lr", "precision", "seed",
          "out", "cache", "workers", "cache_workers", "checkpoint_every", "compile", "log_every",
          "balance", "bucket_mb", "dist_timeout", "patience")


def train_options(args: argparse.Namespace) -> dict[str, object]:
    """The TrainConfig fields of the flags given on the command line (a flag left out is absent:
    a new run takes TrainConfig's default, a resumed run the saved value)."""
    opts: dict[str, object] = {k: getattr(args, k) for k in _PLAIN if getattr(args, k) is not None}
    opts["device"] = args.device  # may always change on resume
    if args.split is not None:
        opts["split"] = tuple(floats_arg(args.split, 3, "--split"))
    if args.freeze is not None:
        opts["freeze"] = tuple(x for x in args.freeze.split(",") if x)
    if args.weights is not None:
        opts["prefactors"] = dict(zip("efsm", floats_arg(args.weights, 4, "--weights")))
    if args.stage_two_weights is not None:
        opts["stage_two_prefactors"] = dict(zip("efsm", floats_arg(args.stage_two_weights, 4,
                                                                   "--stage-two-weights")))
    arch = {k: v for k, v in (("force_head", args.force_head), ("stress_head", args.stress_head))
            if v is not None}
    if arch:
        if not args.resume and opts.get("model", _D.model) != "heads":
            raise ValueError(f"--force-head and --stress-head are options of --model heads, not "
                             f"{opts.get('model', _D.model)!r}")
        opts["model_config"] = arch
    if args.refit_atomref is not None:
        opts["refit_atom_ref"] = args.refit_atomref
    for flag, field, value in (("skip_bad", "skip_bad", True), ("tensorboard", "tensorboard", True),
                               ("resume", "resume", True), ("no_progress", "progress", False),
                               ("no_plots", "plots", False)):
        if getattr(args, flag):
            opts[field] = value
    return opts


def options_with_file(args: argparse.Namespace) -> dict[str, object]:
    """The options of ``--config FILE`` (when given) overridden by the flags given. A ``device``
    in the file applies unless ``--device`` names another than the default (auto)."""
    opts = train_options(args)
    if args.config is None:
        return opts
    from_file = config_fields(read_config_file(args.config), source=f"--config {args.config}")
    merged = {**from_file, **opts}
    if "device" in from_file and args.device == "auto":
        merged["device"] = from_file["device"]
    if "model_config" in from_file and "model_config" in opts:
        merged["model_config"] = {**from_file["model_config"], **opts["model_config"]}  # type: ignore[dict-item]
    return merged


def run_train(args: argparse.Namespace) -> int:
    opts = options_with_file(args)
    try:
        train(TrainConfig(**opts), given=set(opts))
    except (DistributedTrainingError, TrainingDivergedError, CheckpointWriteError) as exc:
        print(f"fastchgnet train: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="MAEs of a checkpoint on a dataset",
                       description="Evaluate a model (0.3.0 or a checkpoint) on a dataset: MAE table, "
                                   "a JSON report and parity plots.")
    p.add_argument("model", help="0.3.0 or a checkpoint path (e.g. runs/train/best.pt)")
    add_data_args(p)
    p.add_argument("--limit", type=int, default=None, help="only the first N samples")
    p.add_argument("--batch-size", type=int, default=32)
    add_device_arg(p)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write eval.json and parity plots here")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model = load_model(args.model, device=device)
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
        (out / "eval.json").write_text(json.dumps(json_safe(result), indent=1) + "\n")
        print(f"# saved {out / 'eval.json'} and {len(result['plots'])} parity plots")
    return 0
