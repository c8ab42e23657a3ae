"""Training throughput: fastchgnet's :class:`~fastchgnet.train.Trainer` against chgnet's
``chgnet.trainer.Trainer``, on the same labelled structures and the same device, in one run.

Both sides train the same architecture (CHGNet 0.3.0 hyper-parameters: a fresh
``chgnet.model.CHGNet()`` and our exact model with the default ``CHGNetConfig``, which starts from
the very same random weights, converted to our layout) on energy per atom, forces, stress (GPa)
and magnetic moments with the same settings, passed explicitly to both:

    Adam, lr 1e-3; Huber loss, delta 0.1;
    L = 1 * huber(e) + 1 * huber(f) + 0.1 * huber(s) + 0.1 * huber(m)   (chgnet Trainer defaults)

(the AtomRef composition model fixed in both). Each trainer keeps its own learning-rate schedule
(chgnet: ``CosLR`` stepped ten times per epoch; ours: cosine per step) and its own data path.

What is timed, per side, is one training epoch over all ``N`` structures (every structure once,
batches of ``B``, shuffled), after graph construction and after a warm-up epoch:

* **chgnet** — ``Trainer._train(train_loader, epoch)``, the epoch function its ``train()`` calls,
  without the validation, checkpoint and test steps ``train()`` adds around it. The loader is
  chgnet's own: ``StructureData`` + ``get_train_val_test_loader(train_ratio=1, val_ratio=0)``
  (``collate_graphs``, ``num_workers=0``, ``pin_memory`` on CUDA as chgnet's default).
  ``StructureData.__getitem__`` converts a structure with ``CrystalGraphConverter`` on first
  access and caches the result (``functools.cache``), so every index is read once before any
  timing: the timed epochs take graphs from that cache. Inside the
  timed part: collation, ``requires_grad`` on the coordinates, the copy to the device, the model's
  own featurisation (``BatchedGraph.from_graphs``) and forward (efsm), ``CombinedLoss``, backward,
  ``optimizer.step``, the scheduler and its per-step logging (``.item()`` of loss and MAEs; the
  printing is silenced).
* **fastchgnet** — ``Trainer.fit()`` for exactly one epoch: before each call the config's epoch
  count is set to one more than the epochs done (``trainer.cfg.epochs = trainer.epoch + 1``; the
  learning-rate schedule keeps the length it was built with). Graphs come from a graph cache
  (:func:`fastchgnet.data.cache.build_cache`) built before timing. Inside the timed part: the
  DataLoader over the memory-mapped cache (``GraphDataset``, ``EpochBatchSampler``, ``Collator``:
  reading, collation, label collation; ``TrainConfig.workers`` processes, by default 0 on the CPU
  and 4 on CUDA; they persist across epochs, so only the warm-up epoch pays their start-up),
  the copy to the device (``DevicePrefetcher``), forward (efsm, ``create_graph``), ``EFSMLoss``,
  backward, Adam, scheduler, loss bookkeeping, and ``fit``'s end-of-epoch work: there is no
  validation set, so no validation, but the epoch's loss is read on the host, ``metrics.csv`` is
  written and ``last.pt`` (model, optimiser and scheduler state) saved — work chgnet's ``_train``
  does not do, a few milliseconds per epoch.

Ours and chgnet's epochs are interleaved (ours, ref, ref, ours, ...) so neither always runs first;
medians are reported. Throughput = structures per second = ``N * epochs / median time``; ratio =
ours / chgnet (> 1: fastchgnet faster). On CUDA a row also holds the peak memory of one extra
epoch per side (``torch.cuda.max_memory_allocated`` after a reset; both models and optimisers are
resident during either measurement, a few MiB) and the part of it above what was allocated
before the epoch.

Structures: :func:`fastchgnet.bench.train_data.chgnet_like_batch` (MPtrj-like supercells of the
shared LiMnO2 / Li9Co7O16 cells, labelled with the 0.3.0 model's predictions plus noise).

Run: ``python -m fastchgnet.bench.trainer_epochs [--device cpu|cuda] [--batch-sizes 8,16]
[--n-structures N] [--epochs E] [--repeats R] [--json PATH]``; from Python
:func:`run_trainer_bench` (rows) and :func:`format_trainer_table`.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fastchgnet.bench.common import (
    fmt_or_na,
    int_list,
    quiet,
    reference_converter,
    resolve_device,
    save_record,
    start_run,
    step_memory_mib,
    text_table,
    time_interleaved,
    timing_fields,
)
from fastchgnet.bench.train_data import TrainData, chgnet_like_batch, default_max_atoms
from fastchgnet.bench.train_step import HUBER_DELTA, LEARNING_RATE, kernels_env, kernels_used
from fastchgnet.data.cache import build_cache
from fastchgnet.data.readers import samples_from_structures
from fastchgnet.model.config import CHGNetConfig
from fastchgnet.model.exact import CHGNet
from fastchgnet.model.weights import convert_chgnet_state_dict
from fastchgnet.train.data import GraphDataset
from fastchgnet.train import TrainConfig, Trainer
from fastchgnet.units import VASP_KBAR_TO_GPA

__all__ = [
    "LOSS_RATIOS",
    "OursEpochs",
    "RefEpochs",
    "check_same_data",
    "chgnet_dataset",
    "default_batch_sizes",
    "default_n_structures",
    "format_trainer_table",
    "main",
    "our_dataset",
    "run_trainer_bench",
]

# chgnet Trainer defaults (energy_loss_ratio, force_loss_ratio, stress_loss_ratio, mag_loss_ratio)
LOSS_RATIOS = {"e": 1.0, "f": 1.0, "s": 0.1, "m": 0.1}


def default_batch_sizes(device: str) -> tuple[int, ...]:
    """(16, 32, 64) structures per step on CUDA; (8, 16) on the CPU."""
    return (16, 32, 64) if str(device).startswith("cuda") else (8, 16)


def default_n_structures(device: str) -> int:
    """Structures in the training set: 512 on CUDA (8 steps per epoch at batch 64, so that the
    per-epoch start-up of a DataLoader is a small part of an epoch), 64 on the CPU (chgnet takes
    about 2 s per step of 8 structures there on one thread)."""
    return 512 if str(device).startswith("cuda") else 64


# ----------------------------------------------------------------------------------------------
# data


def our_dataset(data: TrainData, root: str | Path, *, atom_cutoff: float = 6.0,
                bond_cutoff: float = 3.0, workers: int = 1) -> Any:
    """``GraphDataset`` over a graph cache of ``data`` built under ``root`` (sample ``i`` is
    ``data.structures[i]``; stress in GPa as in ``data``)."""
    samples = samples_from_structures(data.structures, [float(e) for e in data.energy],
                                      forces=data.forces, stresses=data.stress,
                                      magmoms=data.magmom, source="<bench.trainer_epochs>")
    key = f"bench.trainer_epochs:{data.source}:{data.seed}:{len(data)}:{data.n_atoms}"
    cache = build_cache(samples, root, source_hash=key, atom_cutoff=atom_cutoff,
                        bond_cutoff=bond_cutoff, workers=workers)
    return GraphDataset(cache)


def chgnet_dataset(data: TrainData, converter: Any = None) -> Any:
    """chgnet's ``StructureData`` of ``data`` (index ``i`` is ``data.structures[i]``), with every
    graph already converted and held in its ``__getitem__`` cache.

    ``StructureData`` takes VASP stresses (kBar, compressive positive) and multiplies them by
    -0.1 (:data:`fastchgnet.units.VASP_KBAR_TO_GPA`); the GPa labels are passed as
    ``s / VASP_KBAR_TO_GPA`` (``-10 * s``) so that both trainers see the same numbers.
    """
    from chgnet.data.dataset import StructureData

    with quiet():
        ds = StructureData(
            structures=list(data.structures),
            energies=[float(e) for e in data.energy],
            forces=[np.asarray(f) for f in data.forces],
            stresses=[np.asarray(s) / VASP_KBAR_TO_GPA for s in data.stress],
            magmoms=[np.asarray(m) for m in data.magmom],
            structure_ids=[str(i) for i in range(len(data))],
            graph_converter=converter if converter is not None else reference_converter(),
            shuffle=False,
        )
        for i in range(len(ds)):  # convert now: functools.cache keeps the graphs
            ds[i]
    if ds.failed_idx:
        raise ValueError(f"chgnet could not convert structures {sorted(ds.failed_idx)}")
    return ds


def check_same_data(ours: Any, ref: Any, atol: float = 1e-5) -> dict[str, int]:
    """Check that both datasets hold the same labels and graph sizes; return the graph sizes
    (summed over the dataset) of both."""
    sizes = ours.sizes()  # atoms, directed bonds, angles per sample
    ref_bonds = ref_angles = 0
    for i in range(len(ref)):
        g, t = ref[i]
        ref_bonds += int(g.atom_graph.shape[0])
        ref_angles += int(g.bond_graph.shape[0])
        s = ours[i]
        for name, a, b in (("e", s.energy_per_atom, t["e"]), ("f", s.forces, t["f"]),
                           ("s", s.stress, t["s"]), ("m", s.magmom, t["m"])):
            if not np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
                               atol=atol, rtol=1e-5):
                raise AssertionError(f"structure {i}: label {name} differs between the datasets")
    return {"atoms": int(sizes[:, 0].sum()), "directed_bonds": int(sizes[:, 1].sum()),
            "bonds": int(sizes[:, 1].sum()) // 2, "angles": int(sizes[:, 2].sum()),
            "ref_directed_bonds": ref_bonds, "ref_angles": ref_angles}


# ----------------------------------------------------------------------------------------------
# the two trainers, one epoch per call


def _n_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class RefEpochs:
    """chgnet's ``Trainer`` on a fresh ``CHGNet()``; ``self(n)`` trains ``n`` epochs with
    ``Trainer._train`` (chgnet's epoch function), printing silenced."""

    def __init__(self, dataset: Any, batch_size: int, device: str, *, lr: float = LEARNING_RATE,
                 epochs: int = 1, seed: int = 0) -> None:
        with quiet():
            from chgnet.data.dataset import get_train_val_test_loader
            from chgnet.model import CHGNet as RefCHGNet
            from chgnet.trainer import Trainer as RefTrainer

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = RefCHGNet()
            self.trainer = RefTrainer(
                model=model, targets="efsm", optimizer="Adam", criterion="Huber",
                delta=HUBER_DELTA, energy_loss_ratio=LOSS_RATIOS["e"],
                force_loss_ratio=LOSS_RATIOS["f"], stress_loss_ratio=LOSS_RATIOS["s"],
                mag_loss_ratio=LOSS_RATIOS["m"], learning_rate=lr, epochs=epochs,
                use_device=device)
            state = random.getstate()
            random.seed(seed)  # get_train_val_test_loader shuffles with the global `random`
            try:
                self.loader, _ = get_train_val_test_loader(
                    dataset, batch_size=batch_size, train_ratio=1.0, val_ratio=0.0,
                    return_test=False, num_workers=0,
                    pin_memory=str(device).startswith("cuda"))
            finally:
                random.setstate(state)
        self.model = model
        # what Trainer.train() does before its epoch loop (train_composition_model=False)
        model.to(self.trainer.device)
        for p in model.composition_model.parameters():
            p.requires_grad = False
        self.epoch = 0
        self.last_mae: dict[str, float] = {}

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def __call__(self, n_epochs: int = 1) -> None:
        with quiet():
            for _ in range(n_epochs):
                self.last_mae = self.trainer._train(self.loader, self.epoch)
                self.epoch += 1


class OursEpochs:
    """fastchgnet's ``Trainer`` (model ``exact``, default ``CHGNetConfig``); ``self(n)`` runs
    ``Trainer.fit()`` ``n`` times, one epoch each (``cfg.epochs`` set to one more than the epochs
    done). ``epochs``: the length of the learning-rate schedule, and the most epochs it may run.

    ``init_state``: a reference CHGNet ``state_dict`` to start from (converted to our layout);
    otherwise a seeded random initialisation.
    """

    def __init__(self, dataset: Any, batch_size: int, device: str, out: str | Path, *,
                 lr: float = LEARNING_RATE, epochs: int = 1, seed: int = 0,
                 workers: int | None = None, init_state: dict | None = None) -> None:
        cfg = CHGNetConfig()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CHGNet(cfg)
        if init_state is not None:
            model.load_state_dict(convert_chgnet_state_dict(
                {k: v.detach().cpu() for k, v in init_state.items()}, cfg))
        config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, loss="huber",
                             delta=HUBER_DELTA, prefactors=dict(LOSS_RATIOS), device=device,
                             out=str(out), workers=workers, seed=seed, progress=False,
                             plots=False)
        self.trainer = Trainer(model, config, dataset, None, log=lambda msg: None)
        self.model = self.trainer.model
        self.total_epochs = int(epochs)

    @property
    def steps_per_epoch(self) -> int:
        return self.trainer.steps_per_epoch

    @property
    def workers(self) -> int:
        return self.trainer.workers

    def __call__(self, n_epochs: int = 1) -> None:
        t = self.trainer
        for _ in range(n_epochs):
            if t.epoch >= self.total_epochs:
                raise RuntimeError(f"the trainer was set up for {self.total_epochs} epochs")
            step0 = t.step
            t.cfg.epochs = t.epoch + 1  # fit() trains up to cfg.epochs: exactly one more epoch
            t.fit()
            if t.step != step0 + t.steps_per_epoch:
                raise RuntimeError(f"fit ran {t.step - step0} steps, expected {t.steps_per_epoch}")


# ----------------------------------------------------------------------------------------------
# the benchmark


def run_trainer_bench(
    device: str = "auto",
    batch_sizes: Sequence[int] | None = None,
    n_structures: int | None = None,
    epochs: int = 1,
    repeats: int = 3,
    warmup: int = 1,
    kernels: str | None = "auto",
    *,
    reference: bool = True,
    max_atoms: int | None = None,
    lr: float = LEARNING_RATE,
    workers: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Training throughput of both trainers at each batch size; one row per size.

    Args:
        device: ``cpu``, ``cuda`` (``cuda:N``) or ``auto``.
        batch_sizes: structures per optimiser step; default :func:`default_batch_sizes`.
        n_structures: training-set size; default :func:`default_n_structures`.
        epochs: epochs per timed call (per repeat).
        repeats: timed calls per trainer (interleaved ours/ref; medians reported).
        warmup: untimed epochs per trainer first.
        kernels: ``FASTCHGNET_KERNELS`` for the run (None: the environment's).
        reference: also time chgnet when it is installed.
        max_atoms: largest structure; default ``train_data.default_max_atoms`` (cpu 16, cuda 64).
        lr: learning rate of both.
        workers: our ``TrainConfig.workers`` (DataLoader processes; None: the Trainer's default,
            0 on the CPU and 4 on CUDA). chgnet's loader always uses 0 (its graph cache lives in
            the process).
        seed: seed of the structures, labels, initial weights and batch orders.
        threads: torch intra-op threads for the run (restored afterwards).
        progress: called with a message before each stage.

    Row fields: ``case``, ``batch_size``, ``n_structures``, ``epochs`` (per timed call),
    ``steps_per_epoch``, ``atoms``/``bonds``/``directed_bonds``/``angles`` (summed over the
    training set), ``ref_directed_bonds``/``ref_angles``, timing fields (``ours_ms``, ``ref_ms``
    per timed call, minima, all), ``ours_structs_per_s``, ``ref_structs_per_s``, ``ratio``
    (ours/ref throughput), ``ours_params``/``ref_params`` (trainable), ``ours_workers``,
    ``ours_graph_build_s``/``ref_graph_build_s`` (untimed data preparation, for information),
    ``kernels``; on CUDA ``ours_peak_mib``/``ref_peak_mib`` and ``ours_epoch_mib``/
    ``ref_epoch_mib``.
    """
    device = resolve_device(device)
    if threads is not None:
        old = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return run_trainer_bench(device, batch_sizes, n_structures, epochs, repeats, warmup,
                                     kernels, reference=reference, max_atoms=max_atoms, lr=lr,
                                     workers=workers, seed=seed, progress=progress)
        finally:
            torch.set_num_threads(old)
    say = progress or (lambda msg: None)
    sizes = tuple(int(b) for b in (batch_sizes or default_batch_sizes(device)))
    n = int(n_structures or default_n_structures(device))
    max_atoms = int(max_atoms or default_max_atoms(device))
    epochs, repeats, warmup = max(1, int(epochs)), max(1, int(repeats)), max(0, int(warmup))
    cuda = device.startswith("cuda")
    reference = reference and importlib.util.find_spec("chgnet") is not None
    total_epochs = warmup + epochs * repeats + (1 if cuda else 0)

    rows: list[dict] = []
    with kernels_env(kernels), \
            tempfile.TemporaryDirectory(prefix="fastchgnet-bench-trainer-") as tmp:
        used = kernels_used(device)
        say(f"labelling {n} structures (max {max_atoms} atoms)")
        data = chgnet_like_batch(n, seed, max_atoms=max_atoms)
        say("building graphs (our graph cache; chgnet's StructureData cache)")
        t0 = time.perf_counter()
        ours_ds = our_dataset(data, Path(tmp) / "cache")
        ours_build = time.perf_counter() - t0
        ref_ds, ref_build, counts = None, None, {}
        if reference:
            t0 = time.perf_counter()
            ref_ds = chgnet_dataset(data)
            ref_build = time.perf_counter() - t0
            counts = check_same_data(ours_ds, ref_ds)
            if (counts["ref_directed_bonds"], counts["ref_angles"]) != \
                    (counts["directed_bonds"], counts["angles"]):
                warnings.warn(f"graph sizes differ: {counts}", stacklevel=2)
        else:
            sz = ours_ds.sizes()
            counts = {"atoms": int(sz[:, 0].sum()), "directed_bonds": int(sz[:, 1].sum()),
                      "bonds": int(sz[:, 1].sum()) // 2, "angles": int(sz[:, 2].sum())}

        for bs in sizes:
            name = f"trainer efsm b{bs}"
            say(name)
            ref = (RefEpochs(ref_ds, bs, device, lr=lr, epochs=total_epochs, seed=seed)
                   if ref_ds is not None else None)
            ours = OursEpochs(ours_ds, bs, device, Path(tmp) / f"ours-b{bs}", lr=lr,
                              epochs=total_epochs, seed=seed, workers=workers,
                              init_state=ref.model.state_dict() if ref is not None else None)
            fns: dict[str, Callable[[], Any]] = {"ours": lambda run=ours: run(epochs)}
            if ref is not None:
                fns["ref"] = lambda run=ref: run(epochs)
            if warmup:
                ours(warmup)
                if ref is not None:
                    ref(warmup)
            times = time_interleaved(fns, device, repeats=repeats, warmup=0)
            tf = timing_fields(times, repeats, warmup)
            done = n * epochs
            row: dict[str, Any] = {
                "case": name,
                "device": device,
                "batch_size": bs,
                "n_structures": n,
                "epochs": epochs,
                "steps_per_epoch": ours.steps_per_epoch,
                **counts,
                **tf,
                "ours_structs_per_s": done / (tf["ours_ms"] / 1e3),
                "ref_structs_per_s": (done / (tf["ref_ms"] / 1e3)
                                      if tf["ref_ms"] is not None else None),
                "ours_params": _n_trainable(ours.model),
                "ref_params": _n_trainable(ref.model) if ref is not None else None,
                "ref_steps_per_epoch": ref.steps_per_epoch if ref is not None else None,
                "ours_workers": ours.workers,
                "ref_workers": 0 if ref is not None else None,
                "ours_graph_build_s": ours_build,
                "ref_graph_build_s": ref_build,
                "kernels": used,
                "max_atoms": max_atoms,
                "structures": data.source,
                "lr": lr,
                "torch_threads": torch.get_num_threads(),
            }
            if cuda:
                say(f"{name}: peak memory")
                row["ours_peak_mib"], row["ours_epoch_mib"] = step_memory_mib(
                    lambda run=ours: run(1), device)
                if ref is not None:
                    row["ref_peak_mib"], row["ref_epoch_mib"] = step_memory_mib(
                        lambda run=ref: run(1), device)
                else:
                    row.update(ref_peak_mib=None, ref_epoch_mib=None)
            rows.append(row)
            del ours, ref, fns
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# output


def format_trainer_table(rows: list[dict]) -> str:
    """Plain-text table of :func:`run_trainer_bench` rows (memory columns on CUDA)."""
    cuda = any("ours_peak_mib" in r for r in rows)
    head = ["case", "structs", "steps/ep", "atoms", "angles", "ours str/s", "chgnet str/s",
            "ours/chgnet"]
    if cuda:
        head += ["ours MiB", "chgnet MiB"]
    body = []
    for r in rows:
        line = [r["case"], str(r["n_structures"]), str(r["steps_per_epoch"]), str(r["atoms"]),
                str(r["angles"]), fmt_or_na(r["ours_structs_per_s"], ".2f"),
                fmt_or_na(r.get("ref_structs_per_s"), ".2f"),
                "n/a" if r.get("ratio") is None else f"{r['ratio']:.2f}x"]
        if cuda:
            line += [fmt_or_na(r.get("ours_peak_mib"), ".0f"), fmt_or_na(r.get("ref_peak_mib"), ".0f")]
        body.append(line)
    return text_table(head, body)


def main(argv: Sequence[str] | None = None, stream: Any = None) -> list[dict]:
    """``python -m fastchgnet.bench.trainer_epochs``: run, print the table, optionally save JSON."""
    p = argparse.ArgumentParser(prog="python -m fastchgnet.bench.trainer_epochs",
                                description="training throughput, fastchgnet Trainer vs chgnet "
                                            "Trainer")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto [%(default)s]")
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated structures per step [cuda: 16,32,64; cpu: 8,16]")
    p.add_argument("--n-structures", type=int, default=None,
                   help="training-set size [cuda: 512; cpu: 64]")
    p.add_argument("--epochs", type=int, default=1, help="epochs per timed call [%(default)s]")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed calls per trainer, interleaved [%(default)s]")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs first [%(default)s]")
    p.add_argument("--max-atoms", type=int, default=None,
                   help="largest structure [cuda: 64; cpu: 16]")
    p.add_argument("--lr", type=float, default=LEARNING_RATE, help="learning rate [%(default)s]")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers of our trainer [Trainer default: cpu 0, cuda 4]")
    p.add_argument("--kernels", default="auto", choices=("auto", "triton", "torch"),
                   help="FASTCHGNET_KERNELS for the run [%(default)s]")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0, help="seed [%(default)s]")
    p.add_argument("--no-reference", action="store_true", help="time fastchgnet only")
    p.add_argument("--json", default=None, metavar="PATH", help="save environment and rows")
    args = p.parse_args(argv)
    stream = stream or sys.stdout

    device, env = start_run(args.device, args.threads, stream)
    sizes = int_list(args.batch_sizes)
    t0 = time.perf_counter()
    try:
        rows = run_trainer_bench(
            device, sizes, args.n_structures, args.epochs, args.repeats, args.warmup,
            args.kernels, reference=not args.no_reference, max_atoms=args.max_atoms, lr=args.lr,
            workers=args.workers, seed=args.seed,
            progress=lambda msg: print(f"  {msg} ...", file=sys.stderr, flush=True))
    except ValueError as exc:  # e.g. --kernels triton on the CPU without TRITON_INTERPRET=1
        p.error(str(exc))
    wall = time.perf_counter() - t0
    print(format_trainer_table(rows), file=stream)
    src = rows[0]["structures"] if rows else "?"
    print(f"# one epoch = every structure once (efsm, Huber delta {HUBER_DELTA}, prefactors "
          f"{LOSS_RATIOS}, Adam lr {args.lr:g}); graphs built before timing on both sides; "
          f"medians of {args.repeats} interleaved calls of {args.epochs} epoch(s) after "
          f"{args.warmup} warm-up epoch(s); ratio = ours/chgnet structures/s; structures: {src}; "
          f"total {wall:.1f} s", file=stream)
    if args.json:
        settings = {k: getattr(args, k) for k in ("batch_sizes", "n_structures", "epochs",
                                                  "repeats", "warmup", "max_atoms", "lr",
                                                  "workers", "kernels", "threads", "seed",
                                                  "no_reference")}
        settings.update(loss_ratios=LOSS_RATIOS, huber_delta=HUBER_DELTA, optimizer="Adam",
                        targets="efsm",
                        timed={"ours": "Trainer.fit() for one epoch (cfg.epochs = epoch + 1; "
                                       "no validation set; metrics.csv and last.pt written); "
                                       "graph cache built before timing",
                               "ref": "chgnet Trainer._train(train_loader, epoch); StructureData "
                                      "graphs converted and cached before timing"})
        save_record(args.json, env, settings, wall, rows, stream)
    return rows


if __name__ == "__main__":
    main()
