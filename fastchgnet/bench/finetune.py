"""Time-to-accuracy of fine-tuning CHGNet 0.3.0: our default recipe against ``chgnet``'s Trainer.

One *run* fine-tunes 0.3.0 on the training frames of one mlearn element (``<root>/<El>/
training.json``) with one implementation and seed, then evaluates the final model on
``<root>/<El>/test.json``:

* ``ours``: :func:`fastchgnet.train.train` with the defaults of ``fastchgnet train --init 0.3.0``
  (only data, epochs, batch size, seed, device and output paths given; ``--no-progress
  --no-plots``, which change nothing before the test evaluation);
* ``chgnet``: ``chgnet.trainer.Trainer(model=CHGNet.load("0.3.0"), epochs=E, use_device="cpu")``
  otherwise at its defaults (targets ``ef``, MSE, Adam lr 1e-3, CosLR, AtomRef frozen), loaders
  ``DataLoader(StructureData(...), batch_size=B, shuffle=True, collate_fn=collate_graphs)``.

Both get the same frames: a seeded permutation of ``training.json`` (:func:`split_indices`, the
run's seed) cut into 90 % training and 10 % validation frames, written to ``train.json`` /
``val.json`` in the run folder. Both final models are evaluated by the same code
(:func:`fastchgnet.train.evaluate`, batch 16; chgnet's model converted with
:func:`~fastchgnet.model.weights.from_chgnet_model`): ours is its ``best.pt`` (lowest validation
loss), chgnet's is its ``trainer.model`` (chgnet's ``best_model`` is the same object).

Time: ``wall_s`` runs from the start of the job to the end of the last epoch (its validation and
checkpoint writes included): reading the frames, loading 0.3.0, graph building (ours: the graph
cache of train/val/test in worker processes; chgnet: ``StructureData`` converts each graph on its
first use in epoch 1 and caches it), our AtomRef refit pass, the epochs and their validations.
Imports and the final test evaluation are not included. ``cpu_s`` is the process CPU time over
the same span (``time.process_time``): with one torch thread, the work done, whatever else runs on
the machine. ``epochs`` lists, per epoch, the time at
its end and the validation energy MAE (each package's own validation; both are the mean
|ΔE|/atom over the same validation frames). ``time_to_target_s``: the end of the first epoch
whose validation energy MAE is at most the target (the reference's final one); an upper bound at
one-epoch resolution, None if never reached.

Command: ``python -m fastchgnet.bench.finetune --element Ge --seed 0 --impl ours --json out.json``;
``scripts/finetune_time_to_accuracy.py`` runs both for several elements and seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["ELEMENTS", "IMPLS", "compare", "mlearn_root", "run", "run_chgnet", "run_ours",
           "time_to_target", "write_split"]

ELEMENTS = ("Si", "Ge", "Li", "Mo")
IMPLS = ("ours", "chgnet")
VAL_FRACTION = 0.1
EVAL_BATCH = 16
_EPOCH_LINE = re.compile(r"epoch\s+\d+/\d+\s")  # our Trainer's end-of-epoch log line


def mlearn_root() -> Path:
    """``$FASTCHGNET_MLEARN_DIR``, else ``../shared/data/mlearn`` next to the repository."""
    env = os.environ.get("FASTCHGNET_MLEARN_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "mlearn"


def write_split(element: str, seed: int, work: Path, root: Path | None = None,
                limit: int | None = None) -> dict[str, Any]:
    """Write the seeded 90/10 train/val split of ``<root>/<element>/training.json`` (its first
    ``limit`` frames when given) to ``work/train.json`` and ``work/val.json``; returns the paths
    (and ``test`` = ``<root>/<element>/test.json``) and the frame indices."""
    from fastchgnet.train.data import split_indices

    root = Path(root) if root is not None else mlearn_root()
    src = root / element / "training.json"
    frames = json.loads(src.read_text())
    if limit is not None:
        frames = frames[:limit]
    tr, va, _ = split_indices(len(frames), (1 - VAL_FRACTION, VAL_FRACTION, 0.0), seed=seed)
    work.mkdir(parents=True, exist_ok=True)
    files = {"train": work / "train.json", "val": work / "val.json", "test": root / element / "test.json"}
    files["train"].write_text(json.dumps([frames[i] for i in tr]))
    files["val"].write_text(json.dumps([frames[i] for i in va]))
    return {"files": {k: str(v) for k, v in files.items()}, "source": str(src),
            "train_indices": tr.tolist(), "val_indices": va.tolist()}


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _test_mae(model: Any, test_file: str, cache: Path) -> dict[str, float]:
    """MAEs of ``model`` (ours) on ``test_file`` by :func:`fastchgnet.train.evaluate`, in meV/atom,
    meV/Å and GPa."""
    from fastchgnet.train import GraphDataset, evaluate, prepare_data

    with contextlib.redirect_stdout(sys.stderr):
        tc = prepare_data(test_file, format="mlearn", cache_root=cache, workers=1, log=lambda m: None)
    res = evaluate(model, GraphDataset(tc), batch_size=EVAL_BATCH, device="cpu")
    return _units(res)


def _units(res: dict[str, Any]) -> dict[str, float]:
    return {"e_mae": 1e3 * float(res["e_mae"]), "f_mae": 1e3 * float(res["f_mae"]),
            "s_mae": float(res["s_mae"]), "n": int(res.get("n", res.get("n_test", 0)))}


def run_ours(files: dict[str, str], seed: int, work: Path, *, epochs: int = 3,
             batch_size: int = 8, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune with our defaults (``fastchgnet train --init 0.3.0``); see the module doc.
    ``options``: TrainConfig fields that replace the defaults (to compare recipes; not used by
    the benchmark)."""
    from fastchgnet.train import TrainConfig, train
    from fastchgnet.train.report import read_metrics

    out = work / "ours"
    stamps: list[tuple[float, float]] = []
    lines: list[str] = []
    t0, c0 = time.perf_counter(), time.process_time()

    def log(msg: str) -> None:
        if _EPOCH_LINE.match(msg):
            stamps.append((time.perf_counter() - t0, time.process_time() - c0))
        lines.append(msg)
        print(msg, file=sys.stderr, flush=True)

    cfg = TrainConfig(data=files["train"], format="mlearn", val_data=files["val"],
                      test_data=files["test"], init="0.3.0", epochs=epochs, batch_size=batch_size,
                      seed=seed, device="cpu", out=str(out), cache=str(work / "cache-ours"),
                      progress=False, plots=False, **(options or {}))
    result = train(cfg, log=log)
    total = time.perf_counter() - t0
    rows = read_metrics(out / "metrics.csv")
    curve = [{"epoch": int(r["epoch"]), "t_s": t, "cpu_s": c, "val_e_mae": 1e3 * float(r["val_e_mae"]),
              "val_f_mae": 1e3 * float(r["val_f_mae"]), "train_s": float(r["time_s"])}
             for r, (t, c) in zip(rows, stamps)]
    return {"impl": "ours", "recipe": lines[0] if lines else "", "log": lines,
            "wall_s": stamps[-1][0] if stamps else float("nan"),
            "cpu_s": stamps[-1][1] if stamps else float("nan"), "total_s": total, "epochs": curve,
            "test": _units(result), "best_epoch": result.get("best", {}).get("epoch"),
            "options": options or {},
            # whether the run compiled its step, when and from what (Inductor's cache or not)
            "compile_log": [m for m in lines if m.startswith("compile:")],
            "compile_record": _compile_record()}


def _compile_record() -> dict[str, Any] | None:
    """The entry of fastchgnet.compile.memory for the fine-tuned model's step after the run."""
    from fastchgnet import load_model
    from fastchgnet.compile import memory

    return memory.recall(memory.step_key(load_model("0.3.0"), ddp=False))  # as the trainer


def run_chgnet(files: dict[str, str], seed: int, work: Path, *, epochs: int = 3,
               batch_size: int = 8) -> dict[str, Any]:
    """Fine-tune with ``chgnet``'s Trainer at its defaults; see the module doc."""
    from fastchgnet.data.readers import read_dataset
    from fastchgnet.model.weights import from_chgnet_model
    from fastchgnet.train import GraphDataset, evaluate, prepare_data

    with contextlib.redirect_stdout(sys.stderr):
        from chgnet.data.dataset import StructureData, collate_graphs
        from chgnet.model import CHGNet as RefCHGNet
        from chgnet.trainer import Trainer as RefTrainer
    from torch.utils.data import DataLoader

    _seed_all(seed)
    curve: list[dict[str, Any]] = []
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(sys.stderr):  # chgnet prints its progress
        def data(path: str) -> Any:
            frames = list(read_dataset(path, format="mlearn"))
            return StructureData([s.structure for s in frames], [s.energy_per_atom for s in frames],
                                 [np.asarray(s.forces) for s in frames], shuffle=False)

        train_ds, val_ds = data(files["train"]), data(files["val"])
        model = RefCHGNet.load(model_name="0.3.0")
        trainer = RefTrainer(model=model, epochs=epochs, use_device="cpu", print_freq=10**6)
        save = trainer.save_checkpoint

        def save_and_stamp(epoch: int, mae_error: dict, save_dir: str) -> None:
            save(epoch, mae_error, save_dir=save_dir)
            curve.append({"epoch": epoch + 1, "t_s": time.perf_counter() - t0,
                          "cpu_s": time.process_time() - c0,
                          "val_e_mae": 1e3 * float(mae_error["e"]),
                          "val_f_mae": 1e3 * float(mae_error.get("f", float("nan")))})

        trainer.save_checkpoint = save_and_stamp  # type: ignore[method-assign]
        tl = DataLoader(train_ds, batch_size=batch_size, shuffle=True, collate_fn=collate_graphs)
        vl = DataLoader(val_ds, batch_size=batch_size, shuffle=False, collate_fn=collate_graphs)
        trainer.train(tl, vl, save_dir=str(work / "chgnet"))
    wall = curve[-1]["t_s"] if curve else float("nan")
    final = from_chgnet_model(trainer.model)
    test = _test_mae(final, files["test"], work / "cache-eval")
    with contextlib.redirect_stdout(sys.stderr):
        vc = prepare_data(files["val"], format="mlearn", cache_root=work / "cache-eval", workers=1,
                          log=lambda m: None)
    val_ours_code = _units(evaluate(final, GraphDataset(vc), batch_size=EVAL_BATCH, device="cpu"))
    return {"impl": "chgnet", "wall_s": wall, "cpu_s": curve[-1]["cpu_s"] if curve else float("nan"),
            "total_s": time.perf_counter() - t0, "epochs": curve,
            "test": test, "final_val_by_our_evaluate": val_ours_code,
            "recipe": "chgnet Trainer defaults: targets ef, MSE, Adam lr 1e-3, CosLR (T_max 10 x "
                      "epochs, stepped 10 x per epoch), energy/force ratio 1/1, AtomRef frozen"}


def time_to_target(curve: Sequence[dict[str, Any]], target: float, clock: str = "t_s"
                   ) -> float | None:
    """End time (``clock``: ``t_s`` wall, ``cpu_s`` CPU) of the first epoch whose validation
    energy MAE is <= ``target`` (None: never)."""
    for row in curve:
        if row["val_e_mae"] <= target * (1 + 1e-9):
            return float(row[clock])
    return None


def compare(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Ratios ours / reference and the time each needs to reach the reference's final validation
    energy MAE."""
    target = ref["epochs"][-1]["val_e_mae"] if ref.get("epochs") else float("nan")
    t_ours, t_ref = time_to_target(ours["epochs"], target), time_to_target(ref["epochs"], target)
    out: dict[str, Any] = {
        "target_val_e_mae": target, "ours_time_to_target_s": t_ours, "ref_time_to_target_s": t_ref,
        "e_ratio": ours["test"]["e_mae"] / ref["test"]["e_mae"],
        "f_ratio": ours["test"]["f_mae"] / ref["test"]["f_mae"],
        "s_ratio": ours["test"]["s_mae"] / ref["test"]["s_mae"],
        "wall_ratio": ours["wall_s"] / ref["wall_s"],
        "time_to_target_ratio": (t_ours / t_ref) if t_ours is not None and t_ref else None,
    }
    if "cpu_s" in ours and "cpu_s" in ref:  # records from before cpu_s was measured lack it
        c_ours = time_to_target(ours["epochs"], target, "cpu_s")
        c_ref = time_to_target(ref["epochs"], target, "cpu_s")
        out.update(cpu_ratio=ours["cpu_s"] / ref["cpu_s"], ours_cpu_to_target_s=c_ours,
                   ref_cpu_to_target_s=c_ref)
    out["targets_met"] = {"energy_le_0.8": out["e_ratio"] <= 0.8, "force_le_1.0": out["f_ratio"] <= 1.0,
                          "wall_le_0.5": out["wall_ratio"] <= 0.5}
    return out


def run(impl: str, element: str, seed: int, work: Path, *, epochs: int = 3, batch_size: int = 8,
        root: Path | None = None, limit: int | None = None, threads: int | None = None,
        options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One fine-tune (``impl`` ``ours`` or ``chgnet``) of ``element`` with ``seed``, in ``work``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if threads is not None:
        torch.set_num_threads(int(threads))
    split = write_split(element, seed, work, root=root, limit=limit)
    if impl == "ours":
        res = run_ours(split["files"], seed, work, epochs=epochs, batch_size=batch_size,
                       options=options)
    else:
        res = run_chgnet(split["files"], seed, work, epochs=epochs, batch_size=batch_size)
    res.update(element=element, seed=seed, epochs_requested=epochs, batch_size=batch_size,
               threads=torch.get_num_threads(), n_train=len(split["train_indices"]),
               n_val=len(split["val_indices"]), files=split["files"])
    return res


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--element", default="Ge")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impl", choices=IMPLS, default="ours")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="first N frames of training.json")
    p.add_argument("--root", default=None, help="mlearn folder [$FASTCHGNET_MLEARN_DIR or "
                                                "../shared/data/mlearn]")
    p.add_argument("--work", required=True, help="run folder (must not hold a run)")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--ours-options", default=None, metavar="JSON",
                   help='TrainConfig fields replacing our defaults, e.g. \'{"ema_decay": 0.99}\' '
                        "(recipe experiments)")
    a = p.parse_args(argv)
    res = run(a.impl, a.element, a.seed, Path(a.work), epochs=a.epochs, batch_size=a.batch_size,
              root=Path(a.root) if a.root else None, limit=a.limit, threads=a.threads,
              options=json.loads(a.ours_options) if a.ours_options else None)
    text = json.dumps(res, indent=1, default=str)
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(json.dumps({k: res[k] for k in ("impl", "element", "seed", "wall_s", "test")}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
