"""Accuracy of the model variants under one training budget (FastCHGNet Table I analogue).

Trains ``exact``, ``decoupled`` and ``heads`` from scratch with the same architecture, data split,
seed, epochs, batch size and learning rate, and reports their test MAEs (energy meV/atom, forces
meV/Å, stress GPa, magnetic moments mμB) next to the per-element baseline::

    python scripts/accuracy_table.py --dataset mlearn-Si --epochs 30 --out runs/accuracy
    python scripts/accuracy_table.py --dataset builtin --limit 1000 --epochs 8
    python scripts/accuracy_table.py --models heads --prefactors 20,1.5,0.1,0.1
    python scripts/accuracy_table.py --init 0.3.0 --epochs 10 --lr 5e-4   # fine-tuning

The JSON record (one row per variant, with the budget and the wall time) goes to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fastchgnet.bench.common import environment
from fastchgnet.cli import floats_arg
from fastchgnet.train import TrainConfig, train

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mlearn"
ARCH = dict(atom_fea_dim=32, bond_fea_dim=32, angle_fea_dim=32, n_conv=3, atom_conv_hidden_dim=32,
            bond_conv_hidden_dim=32, mlp_hidden_dims=(32, 32), head_hidden_dim=32)


def dataset_args(name: str) -> dict:
    if name == "builtin":
        return {"data": None, "split": (0.9, 0.05, 0.05)}
    if name.startswith("mlearn-"):
        el = name.split("-", 1)[1]
        return {"data": str(SHARED / el / "training.json"), "test_data": str(SHARED / el / "test.json"),
                "split": (0.9, 0.1, 0.0)}
    raise ValueError(f"unknown dataset {name!r}: builtin or mlearn-<El>")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mlearn-Si")
    p.add_argument("--models", default="exact,decoupled,heads")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--stress-head", default="virial", choices=["lattice", "virial"],
                   help="stress head of the heads model [%(default)s]")
    p.add_argument("--force-head", default="direct", choices=["direct", "pair", "pair+direct"],
                   help="force head of the heads model [%(default)s]")
    p.add_argument("--prefactors", default="2,1.5,0.1,0.1",
                   help="loss prefactors e,f,s,m of every model [%(default)s]")
    p.add_argument("--init", default=None,
                   help="fine-tune from these weights (\"0.3.0\" or a checkpoint) instead of "
                        "training the small architecture from scratch")
    p.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay [%(default)s]")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="validate and test a moving average of the weights with this decay [off]")
    p.add_argument("--stage-two-start", type=int, default=None,
                   help="switch to --stage-two-prefactors / --stage-two-lr after this many epochs [off]")
    p.add_argument("--stage-two-prefactors", default=None, help="loss prefactors e,f,s,m of stage two")
    p.add_argument("--stage-two-lr", type=float, default=None, help="constant lr of stage two")
    p.add_argument("--out", default="runs/accuracy")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def efsm(text: str, option: str) -> dict[str, float]:
        try:
            return dict(zip("efsm", floats_arg(text, 4, option)))
        except ValueError as exc:
            p.error(str(exc))

    pref = efsm(args.prefactors, "--prefactors")
    two = efsm(args.stage_two_prefactors, "--stage-two-prefactors") if args.stage_two_prefactors else None
    rows = []
    for model in args.models.split(","):
        arch = ({**ARCH, "stress_head": args.stress_head, "force_head": args.force_head}
                if args.init is None else {})
        cfg = TrainConfig(**dataset_args(args.dataset), model=model, model_config=arch,
                          epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          prefactors=pref, init=args.init, ema_decay=args.ema_decay,
                          weight_decay=args.weight_decay, stage_two_start=args.stage_two_start,
                          stage_two_prefactors=two, stage_two_lr=args.stage_two_lr,
                          limit=args.limit, seed=args.seed, device="cpu", progress=False,
                          plots=False, out=f"{args.out}/{args.dataset}-{model}-s{args.seed}-{args.stress_head}-"
                              f"{'' if args.force_head == 'direct' else args.force_head + '-'}"
                              f"p{args.prefactors.replace(',', '_')}"
                              + (f"-ema{args.ema_decay:g}" if args.ema_decay else "")
                              + (f"-wd{args.weight_decay:g}" if args.weight_decay else "")
                              + (f"-two{args.stage_two_start}-p{args.stage_two_prefactors}-lr{args.stage_two_lr}"
                                 .replace(",", "_") if args.stage_two_start is not None else ""))
        t0 = time.perf_counter()
        metrics = train(cfg)
        rows.append({"model": model, "wall_s": time.perf_counter() - t0, **metrics})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| model | energy meV/atom | forces meV/Å | stress GPa | magmom mμB | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        def f(k: str, scale: float, fmt: str) -> str:
            v = r.get(k)
            return "n/a" if v is None or v != v else format(v * scale, fmt)
        print(f"| {r['model']} | {f('e_mae', 1e3, '.1f')} | {f('f_mae', 1e3, '.1f')} | "
              f"{f('s_mae', 1, '.3f')} | {f('m_mae', 1e3, '.1f')} | {r['wall_s']:.0f} |")
    if args.json:
        record = {"environment": environment("cpu"), "settings": {**vars(args), "arch": arch},
                  "rows": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
