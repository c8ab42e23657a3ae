"""The training path: splits, samplers, the loop, checkpoints and exact resume, outputs, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastchgnet.data.cache import build_cache
from fastchgnet.data.prototypes import random_structures
from fastchgnet.data.readers import samples_from_structures
from fastchgnet.train.data import Collator, EpochBatchSampler, GraphDataset, split_indices
from fastchgnet.train import TrainConfig, Trainer, fit_atom_ref, freeze, train
from fastchgnet.train.report import METRIC_COLUMNS

TINY = dict(atom_fea_dim=8, bond_fea_dim=8, angle_fea_dim=8, num_radial=5, num_angular=5,
            atom_conv_hidden_dim=8, bond_conv_hidden_dim=8, mlp_hidden_dims=(8,), n_conv=2)
MLEARN = Path(__file__).resolve().parents[2] / "shared" / "data" / "mlearn"


def _write_extxyz(path: Path, n: int = 20, seed: int = 0, bad: int | None = None) -> Path:
    """Small random structures with random (finite) labels, as extxyz."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator
    from pymatgen.io.ase import AseAtomsAdaptor

    rng = np.random.default_rng(seed)
    frames = []
    for i, s in enumerate(random_structures(n, seed=seed, max_atoms=6)):
        atoms = AseAtomsAdaptor.get_atoms(s)
        n_at = len(atoms)
        e = -3.0 * n_at + rng.normal(0, 0.2) * n_at
        f = rng.normal(0, 0.3, (n_at, 3))
        if i == bad:
            e = float("nan")  # a required label that is not a number
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f,
                                           stress=rng.normal(0, 0.01, 6))
        atoms.info["magmoms_label"] = 0
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")
    return path


@pytest.fixture(scope="module")
def xyz(tmp_path_factory) -> Path:
    return _write_extxyz(tmp_path_factory.mktemp("data") / "toy.xyz")


def stop_at(step: int):
    """A step callback that stops the run after optimiser step ``step``, as a kill at that moment
    would: no end-of-epoch work, no test report (``train`` returns ``{}``)."""
    def callback(trainer: Trainer) -> None:
        if trainer.step >= step:
            trainer.request_stop()
    return callback


def _cfg(tmp: Path, xyz: Path, **kw) -> TrainConfig:
    base = dict(data=str(xyz), model_config=TINY, epochs=2, batch_size=4, lr=1e-3, out=str(tmp / "run"),
                cache=str(tmp / "cache"), device="cpu", progress=False, plots=False, cache_workers=1,
                split=(0.8, 0.1, 0.1))
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------------
# split and sampler


def test_split_is_reproducible_disjoint_and_complete():
    tr, va, te = split_indices(100, (0.9, 0.05, 0.05), seed=3)
    assert (len(tr), len(va), len(te)) == (90, 5, 5)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(100))
    again = split_indices(100, (0.9, 0.05, 0.05), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, te), again))
    other = split_indices(100, (0.9, 0.05, 0.05), seed=4)
    assert not np.array_equal(tr, other[0])
    # small sets still get one validation and one test sample
    assert [len(x) for x in split_indices(5, (0.9, 0.05, 0.05))] == [3, 1, 1]
    with pytest.raises(ValueError, match="sum"):
        split_indices(10, (0.5, 0.2, 0.2))


def test_epoch_sampler_covers_every_sample_once_and_is_deterministic():
    s = EpochBatchSampler(23, 5, seed=1)
    assert len(s) == 5
    s.set_epoch(0)
    e0 = list(s)
    assert sorted(i for b in e0 for i in b) == list(range(23))
    assert [len(b) for b in e0] == [5, 5, 5, 5, 3]  # the last batch is smaller, nothing dropped
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1
    s.set_epoch(0)
    assert list(s) == e0
    s.skip(3)
    assert list(s) == e0[3:]
    assert list(s) == e0  # skip applies to one iteration only
    assert list(EpochBatchSampler(7, 3, shuffle=False)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert len(EpochBatchSampler(7, 3, drop_last=True)) == 2


def test_training_batches_never_hold_a_single_structure():
    """The trainer's sampler (no_single): a last batch of one shares the previous batch's
    samples evenly; every sample still once, the number of steps unchanged."""
    assert list(EpochBatchSampler(7, 3, shuffle=False, no_single=True)) == [[0, 1, 2], [3, 4], [5, 6]]
    for n, b in ((17, 8), (25, 8), (9, 8), (1, 8), (24, 8), (23, 8), (5, 1)):
        s = EpochBatchSampler(n, b, seed=2, no_single=True)
        batches = list(s)
        assert len(batches) == len(s) == len(EpochBatchSampler(n, b))
        assert sorted(i for x in batches for i in x) == list(range(n))
        if n > 1 and b > 1:
            assert min(len(x) for x in batches) >= 2, (n, b, batches)
    assert [len(x) for x in EpochBatchSampler(17, 8, no_single=True)] == [8, 5, 4]


def test_dataset_and_collator_give_labelled_batches(tmp_path):
    structs = random_structures(5, seed=2, max_atoms=6)
    magmoms = [None if i % 2 else np.full(len(s), 0.5) for i, s in enumerate(structs)]
    samples = list(samples_from_structures(structs, energies=[-1.0, -2.0, -3.0, -4.0, -5.0],
                                           magmoms=magmoms))
    cache = build_cache(samples, tmp_path, source_hash="toy", workers=1)
    ds = GraphDataset(cache, [4, 0, 1])
    assert len(ds) == 3 and ds.sizes().shape == (3, 3)
    batch, targets, ids = Collator()([ds[i] for i in range(3)])
    assert batch.num_graphs == 3
    assert targets.e.tolist() == [-5.0, -1.0, -2.0]
    n = [len(structs[i]) for i in (4, 0, 1)]
    assert targets.m_mask.tolist() == [True] * (n[0] + n[1]) + [False] * n[2]  # missing: masked
    assert not bool(targets.f_mask.any())
    assert ids == [samples[4].id, samples[0].id, samples[1].id]


def test_fit_atom_ref_recovers_per_element_energies(tmp_path):
    structs = random_structures(30, seed=5, max_atoms=8)
    ref = np.zeros(94)
    rng = np.random.default_rng(0)
    ref[:] = rng.normal(-4, 2, 94)
    energies = [float(np.mean([ref[sp.Z - 1] for sp in s.species])) for s in structs]
    cache = build_cache(samples_from_structures(structs, energies=energies), tmp_path,
                        source_hash="ref", workers=1)
    fitted, mae = fit_atom_ref(cache, range(len(structs)))
    assert mae < 1e-8
    present = cache.composition_counts().sum(0) > 0
    # the fit is exact on the training compositions
    frac = cache.composition_counts()[:, present] / cache.composition_counts().sum(1, keepdims=True)
    np.testing.assert_allclose(frac @ fitted[present], energies, atol=1e-8)
    assert np.all(fitted[~present] == 0)


# ------------------------------------------------------------------------------------------------
# the loop, checkpoints, outputs


def test_train_writes_metrics_checkpoints_and_test_report(tmp_path, xyz):
    cfg = _cfg(tmp_path, xyz, plots=True)
    result = train(cfg, log=lambda m: None)
    out = Path(cfg.out)
    for name in ("last.pt", "best.pt", "metrics.csv", "test.json", "config.json", "split.json",
                 "train.log", "parity_energy.png", "parity_forces.png", "parity_stress.png"):
        assert (out / name).is_file(), name
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert set(METRIC_COLUMNS) <= set(rows[0])
    assert float(rows[1]["lr"]) < float(rows[0]["lr"])  # cosine decay
    test = json.loads((out / "test.json").read_text())
    assert test["n_test"] == 2 and test["e_mae"] == pytest.approx(result["e_mae"])
    assert test["m_mae"] is None  # no magmom labels: null, strict JSON
    # best.pt and last.pt load as models
    import fastchgnet

    m = fastchgnet.load_model(out / "best.pt")
    assert m.config.atom_fea_dim == 8
    # a second run into the same directory must not overwrite it silently
    with pytest.raises(FileExistsError, match="resume"):
        train(cfg, log=lambda m: None)


def _params(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "last.pt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("checkpoint_every", [0, 1])
def test_resume_equals_an_uninterrupted_run(tmp_path, xyz, checkpoint_every):
    """Killed after 6 steps (mid epoch 2 of 3; 4 steps per epoch), resumed: same parameters,
    optimiser state and metrics as a run that was never interrupted."""
    ref = _cfg(tmp_path / "a", xyz, epochs=3, cache=str(tmp_path / "cache"))
    train(ref, log=lambda m: None)

    cut = _cfg(tmp_path / "b", xyz, epochs=3, cache=str(tmp_path / "cache"),
               checkpoint_every=checkpoint_every)
    seen: list[tuple[int, int]] = []
    assert train(cut, log=lambda m: None,
                 callbacks=[lambda t: seen.append((t.epoch, t.step)), stop_at(6)]) == {}
    assert seen == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 5), (1, 6)]  # after every step, in order
    ck = torch.load(Path(cut.out) / "last.pt", map_location="cpu", weights_only=True)["trainer"]
    assert ck["step"] == (6 if checkpoint_every else 4)  # mid-epoch checkpoint or epoch end
    train(TrainConfig(out=cut.out, epochs=3, resume=True, device="cpu", progress=False),
          log=lambda m: None)

    a, b = _params(Path(ref.out)), _params(Path(cut.out))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    sa = torch.load(Path(ref.out) / "last.pt", weights_only=True)["trainer"]
    sb = torch.load(Path(cut.out) / "last.pt", weights_only=True)["trainer"]
    assert sa["step"] == sb["step"] == 12 and sa["epoch"] == sb["epoch"] == 3
    assert sa["scheduler"]["last_epoch"] == sb["scheduler"]["last_epoch"]
    with open(Path(ref.out) / "metrics.csv") as fa, open(Path(cut.out) / "metrics.csv") as fb:
        ra, rb = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    assert [r["epoch"] for r in rb] == ["1", "2", "3"]  # no duplicated rows after the resume
    for x, y in zip(ra, rb):
        for col in ("lr", "train_loss", "val_loss", "val_e_mae", "val_f_mae"):
            assert float(x[col]) == pytest.approx(float(y[col]), rel=1e-6), col


def test_dataloader_workers_give_the_same_run(tmp_path, xyz):
    a = _cfg(tmp_path / "a", xyz, epochs=1, cache=str(tmp_path / "cache"))
    b = _cfg(tmp_path / "b", xyz, epochs=1, cache=str(tmp_path / "cache"), workers=1)
    train(a, log=lambda m: None)
    train(b, log=lambda m: None)
    pa, pb = _params(Path(a.out)), _params(Path(b.out))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_compiled_training_of_the_exact_model_follows_the_eager_run(tmp_path, xyz):
    """--compile with a model whose forces are energy derivatives (one process): the traced
    torch.func gradient trains like the eager step (aot_eager: Dynamo and AOTAutograd, fast)."""
    torch._dynamo.reset()
    a = _cfg(tmp_path / "a", xyz, epochs=1, cache=str(tmp_path / "cache"), precision="fp64")
    b = _cfg(tmp_path / "b", xyz, epochs=1, cache=str(tmp_path / "cache"), precision="fp64",
             compile="aot_eager")
    train(a, log=lambda m: None)
    train(b, log=lambda m: None)
    torch._dynamo.reset()
    pa, pb = _params(Path(a.out)), _params(Path(b.out))
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-7, atol=1e-9, msg=k)


def test_resume_can_extend_the_number_of_epochs(tmp_path, xyz):
    cfg = _cfg(tmp_path, xyz, epochs=1)
    train(cfg, log=lambda m: None)
    train(TrainConfig(out=cfg.out, epochs=2, resume=True, device="cpu", progress=False),
          log=lambda m: None)
    with open(Path(cfg.out) / "metrics.csv") as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1", "2"]


def test_resume_without_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="last.pt"):
        train(TrainConfig(out=str(tmp_path / "none"), resume=True, progress=False))


def test_training_lowers_the_loss(tmp_path, xyz):
    cfg = _cfg(tmp_path, xyz, epochs=6, lr=3e-3)
    train(cfg, log=lambda m: None)
    with open(Path(cfg.out) / "metrics.csv") as fh:
        loss = [float(r["train_loss"]) for r in csv.DictReader(fh)]
    assert loss[-1] < 0.8 * loss[0]


def test_fp64_precision_trains_in_float64(tmp_path, xyz):
    cfg = _cfg(tmp_path, xyz, epochs=1, precision="fp64")
    train(cfg, log=lambda m: None)
    sd = _params(Path(cfg.out))
    assert sd["site_wise.weight"].dtype == torch.float64
    with pytest.raises(ValueError, match="CUDA"):
        train(_cfg(tmp_path / "tf", xyz, epochs=1, precision="tf32"), log=lambda m: None)


# ------------------------------------------------------------------------------------------------
# fine-tuning and freezing


def test_freeze_groups_and_prefixes():
    from fastchgnet.model.exact import CHGNet

    model = CHGNet(**TINY)
    frozen = freeze(model, ["embedding", "block0"])
    assert "atom_embedding.weight" in frozen and any(n.startswith("atom_convs.0.") for n in frozen)
    assert not any(n.startswith("atom_convs.1.") for n in frozen)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    with pytest.raises(ValueError, match="matches no parameter"):
        freeze(model, ["no_such_layer"])


def test_finetune_from_pretrained_keeps_frozen_layers(tmp_path, xyz):
    import fastchgnet

    cfg = _cfg(tmp_path, xyz, model_config={}, init="0.3.0", freeze=("embedding", "block0"),
               refit_atom_ref=True, epochs=1, limit=8)
    train(cfg, log=lambda m: None)
    before = fastchgnet.load_model("0.3.0").state_dict()
    after = _params(Path(cfg.out))
    for name in ("atom_embedding.weight", "bond_embed_ag.weight", "atom_convs.0.w_atom",
                 "bond_convs.0.tail.core2.weight"):
        assert torch.equal(before[name], after[name]), name
    for name in ("atom_convs.1.w_atom", "readout.0.weight"):
        assert not torch.equal(before[name], after[name]), name
    assert not torch.equal(before["atom_ref"], after["atom_ref"])  # refitted


# ------------------------------------------------------------------------------------------------
# bad input


def test_bad_entry_stops_with_file_and_entry_or_is_skipped(tmp_path):
    bad = _write_extxyz(tmp_path / "bad.xyz", n=6, seed=1, bad=3)
    with pytest.raises(ValueError, match=r"bad\.xyz.*3"):
        train(_cfg(tmp_path / "x", bad, epochs=1), log=lambda m: None)
    logs: list[str] = []
    train(_cfg(tmp_path / "y", bad, epochs=1, skip_bad=True), log=logs.append)
    assert any("skipped 1 bad entries" in m for m in logs), logs
    assert any("5 samples" in m for m in logs), logs


def test_cli_train_and_evaluate(tmp_path, xyz, capsys):
    from fastchgnet.cli import main

    out = tmp_path / "cli"
    args = ["train", "--data", str(xyz), "--epochs", "1", "--batch-size", "4", "--out", str(out),
            "--cache", str(tmp_path / "cache"), "--device", "cpu", "--no-progress", "--no-plots",
            "--split", "0.8,0.1,0.1", "--ema-decay", "0.9", "--stage-two-start", "0",
            "--stage-two-weights", "5,1,0.1,0.1", "--stage-two-lr", "1e-4"]
    # the CLI cannot set a tiny architecture; fine-tune the tiny model saved by the API instead
    train(_cfg(tmp_path / "api", xyz, epochs=1), log=lambda m: None)
    args += ["--init", str(tmp_path / "api" / "run" / "best.pt")]
    assert main(args) == 0
    assert (out / "test.json").is_file()
    saved = json.loads((out / "config.json").read_text())
    assert saved["ema_decay"] == 0.9 and saved["stage_two_start"] == 0 and saved["stage_two_lr"] == 1e-4
    assert saved["stage_two_prefactors"] == {"e": 5.0, "f": 1.0, "s": 0.1, "m": 0.1}
    assert main(["evaluate", str(out / "best.pt"), "--data", str(xyz), "--cache", str(tmp_path / "cache"),
                 "--device", "cpu", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["n_test"] == 20
    assert "test MAE" in capsys.readouterr().out
    assert main(["train", "--out", str(out), "--device", "cpu"]) == 1  # exists: clear error


# ------------------------------------------------------------------------------------------------
# real DFT data


@pytest.mark.skipif(not (MLEARN / "Si" / "training.json").is_file(), reason="shared mlearn data absent")
def test_mlearn_si_training_beats_the_per_element_baseline(tmp_path):
    small = dict(TINY, atom_fea_dim=16, bond_fea_dim=16, angle_fea_dim=16, num_radial=9, num_angular=9,
                 atom_conv_hidden_dim=16, bond_conv_hidden_dim=16, mlp_hidden_dims=(16,))
    cfg = TrainConfig(data=str(MLEARN / "Si" / "training.json"), test_data=str(MLEARN / "Si" / "test.json"),
                      model_config=small, epochs=4, batch_size=8, lr=3e-3, out=str(tmp_path / "run"),
                      cache=str(tmp_path / "cache"), device="cpu", progress=False, plots=False,
                      cache_workers=1, split=(0.9, 0.1, 0.0))
    result = train(cfg, log=lambda m: None)
    with open(tmp_path / "run" / "metrics.csv") as fh:
        loss = [float(r["train_loss"]) for r in csv.DictReader(fh)]
    assert loss[-1] < loss[0]
    assert result["n_test"] == 25
    assert result["e_mae"] < 0.5 * result["baseline_e_mae"], result


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tf32_accuracy_holds_on_cuda(tmp_path, xyz):
    """tf32 is offered because this holds: 0.3.0 predictions with TF32 matmuls stay within a few
    meV/atom and tens of meV/Å of float32, and a tf32 run trains."""
    import fastchgnet
    from fastchgnet.data import build_graphs, collate
    from fastchgnet.train.runtime import precision_context

    model = fastchgnet.load_model("0.3.0", device="cuda")
    batch = collate(build_graphs(random_structures(8, seed=15, max_atoms=24))).to("cuda")
    before = torch.backends.cuda.matmul.allow_tf32
    ref = model(batch, task="efsm")
    with precision_context("tf32", torch.device("cuda")):
        assert torch.backends.cuda.matmul.allow_tf32
        out = model(batch, task="efsm")
    assert torch.backends.cuda.matmul.allow_tf32 == before  # restored
    assert (out["e"] - ref["e"]).abs().max() < 5e-3
    assert (out["f"] - ref["f"]).abs().max() < 5e-2
    assert (out["m"] - ref["m"]).abs().max() < 5e-3
    train(_cfg(tmp_path, xyz, epochs=1, precision="tf32", device="cuda"), log=lambda m: None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_prefetcher_copies_pinned_batches_on_a_side_stream(tmp_path):
    from fastchgnet.train.data import DevicePrefetcher

    structs = random_structures(12, seed=3, max_atoms=8)
    cache = build_cache(samples_from_structures(structs, energies=[-1.0] * 12), tmp_path,
                        source_hash="pf", workers=1)
    ds = GraphDataset(cache)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=EpochBatchSampler(12, 5, shuffle=False),
                                         collate_fn=Collator(), pin_memory=True)
    got = list(DevicePrefetcher(loader, "cuda"))
    want = list(loader)
    assert len(got) == len(want) == 3
    for (b, t, ids), (b0, t0, ids0) in zip(got, want):
        assert b.positions.is_cuda and t.e.is_cuda and ids == ids0
        assert torch.equal(b.positions.cpu(), b0.positions) and torch.equal(b.bond_src.cpu(), b0.bond_src)
        assert torch.equal(t.e.cpu(), t0.e)


def test_demo_trains_on_the_builtin_dataset(tmp_path, monkeypatch, capsys):
    from fastchgnet.cli import main

    monkeypatch.setenv("FASTCHGNET_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--from-scratch", "--limit", "12", "--epochs", "1", "--batch-size", "4",
                 "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "MAE on held-out" in text and "best.pt" in text and "parity plots" in text
    assert json.loads((out / "test.json").read_text())["n_test"] == 1
    assert main(["demo", "--predict", "--no-bench", "--device", "cpu"]) == 0
    assert "CHGNet 0.3.0" in capsys.readouterr().out


def test_sigkill_mid_run_then_resume_loses_nothing(tmp_path, xyz):
    """A real `fastchgnet train` process killed with SIGKILL while writing checkpoints every step
    resumes from an intact last.pt and ends with the parameters of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from fastchgnet.cli import main

    train(_cfg(tmp_path / "init", xyz, epochs=1), log=lambda m: None)  # a tiny model to start from
    common = ["train", "--data", str(xyz), "--init", str(tmp_path / "init" / "run" / "best.pt"),
              "--epochs", "12", "--batch-size", "4", "--lr", "1e-3", "--split", "0.8,0.1,0.1",
              "--cache", str(tmp_path / "cache"), "--device", "cpu", "--no-progress", "--no-plots",
              "--checkpoint-every", "1"]
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as this process
    proc = subprocess.Popen([sys.executable, "-m", "fastchgnet", *common, "--out", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step = 0
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (killed / "last.pt").is_file():
            step = torch.load(killed / "last.pt", weights_only=True)["trainer"]["step"]
            if step >= 10:
                break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be killed (machine too fast for this test)")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(killed / "last.pt", weights_only=True)["trainer"]
    assert 10 <= state["step"] < 48
    assert main([*common, "--out", str(killed), "--resume"]) == 0
    assert not list(killed.glob("*.tmp"))  # temp files of the killed write are cleaned up

    ref = tmp_path / "ref"
    assert main([*common, "--out", str(ref)]) == 0
    a, b = _params(ref), _params(killed)
    # two processes may sum in different orders (threads): equal to round-off. A lost or repeated
    # Adam step (lr 1e-3) would move parameters by ~1e-3.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    with open(killed / "metrics.csv") as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == [str(i) for i in range(1, 13)]


def test_train_the_decoupled_model(tmp_path, xyz):
    import fastchgnet

    cfg = _cfg(tmp_path, xyz, epochs=1, model="decoupled")
    train(cfg, log=lambda m: None)
    assert isinstance(fastchgnet.load_model(Path(cfg.out) / "best.pt"), fastchgnet.DecoupledCHGNet)
    # the decoupled model can start from exact weights (here: the 0.3.0 checkpoint)
    ft = _cfg(tmp_path / "ft", xyz, epochs=1, model="decoupled", model_config={}, init="0.3.0", limit=6)
    train(ft, log=lambda m: None)
    assert fastchgnet.load_model(Path(ft.out) / "best.pt").model_type == "decoupled"


def test_the_old_trainer_module_re_exports_and_the_library_does_not_use_it():
    """fastchgnet.train.trainer is kept for compatibility (no warning); no module of
    fastchgnet.train imports it, nor the benchmark harness, nor a test hook."""
    import ast

    import fastchgnet.train as ft
    import fastchgnet.train.trainer as old

    for name in ("TrainConfig", "Trainer", "evaluate", "fit_atom_ref", "freeze", "prepare_data",
                 "train", "read_metrics", "build_model"):
        assert getattr(old, name) is getattr(ft, name), name
    assert old.METRIC_COLUMNS == METRIC_COLUMNS and callable(old.precision_context)
    assert callable(old._json_safe)  # used by older `fastchgnet evaluate`
    pkg = Path(ft.__file__).parent
    for path in pkg.glob("*.py"):
        if path.name == "trainer.py":
            continue
        text = path.read_text()
        assert "FASTCHGNET_FAULT_INJECT" not in text and "stop_after_steps" not in text, path
        for node in ast.walk(ast.parse(text)):
            mods = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                    [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for mod in mods:
                assert mod != "fastchgnet.train.trainer" and not mod.startswith("fastchgnet.bench"), \
                    (path.name, mod)


# ------------------------------------------------------------------------------------------------
# run options: --config, --patience, --tensorboard


def _has_tensorboard() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def test_config_file_round_trip_and_cli_override(tmp_path, xyz):
    from fastchgnet.cli import build_parser, main
    from fastchgnet.cli.train import options_with_file

    run = tmp_path / "run.json"
    run.write_text(json.dumps({
        "data": str(xyz), "model_config": TINY, "batch-size": 4, "epochs": 3, "lr": 1e-3,
        "split": "0.8,0.1,0.1", "weights": [1, 1, 0.1, 0], "cache": str(tmp_path / "cache"),
        "cache-workers": 1, "no-progress": True, "no_plots": True, "device": "cpu"}))
    out = tmp_path / "a"
    assert main(["train", "--config", str(run), "--epochs", "1", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())  # the effective configuration
    assert saved["epochs"] == 1 and saved["batch_size"] == 4  # the flag overrides the file
    assert saved["prefactors"] == {"e": 1.0, "f": 1.0, "s": 0.1, "m": 0.0}
    assert saved["split"] == [0.8, 0.1, 0.1] and saved["device"] == "cpu" and not saved["plots"]
    # a run's config.json is a config file: the same TrainConfig comes back (but --out)
    p = build_parser()
    again = options_with_file(p.parse_args(["train", "--config", str(out / "config.json"),
                                            "--out", str(tmp_path / "b")]))
    assert TrainConfig(**again).to_dict() == {**saved, "out": str(tmp_path / "b")}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"batch-sise": 4}))
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "c")]) == 1


def test_yaml_config_needs_pyyaml(tmp_path):
    from fastchgnet.train.config_file import read_config_file

    f = tmp_path / "run.yaml"
    f.write_text("batch-size: 4\nepochs: 2\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="PyYAML"):
            read_config_file(f)
    else:
        assert read_config_file(f) == {"batch-size": 4, "epochs": 2}


def test_patience_stops_early_and_keeps_best(tmp_path, xyz, monkeypatch):
    losses = iter([1.0, 2.0, 3.0, 4.0, 5.0])

    def validate(self):
        return {"loss": next(losses), "e_mae": 0.1, "f_mae": 0.1, "s_mae": 0.1, "m_mae": 0.1, "n": 2}

    monkeypatch.setattr(Trainer, "validate", validate)
    logs: list[str] = []
    cfg = _cfg(tmp_path, xyz, epochs=5, patience=2)
    train(cfg, log=logs.append)
    out = Path(cfg.out)
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and list(rows[0]) == list(METRIC_COLUMNS)
    assert any(m.startswith("early stop after epoch 3") for m in logs), logs
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == 1
    with pytest.raises(ValueError, match="patience"):
        TrainConfig(patience=0)


@pytest.mark.skipif(not _has_tensorboard(), reason="tensorboard is not installed")
def test_tensorboard_writes_event_file(tmp_path, xyz):
    cfg = _cfg(tmp_path, xyz, epochs=1, tensorboard=True)
    train(cfg, log=lambda m: None)
    assert list((Path(cfg.out) / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.skipif(_has_tensorboard(), reason="tensorboard is installed")
def test_tensorboard_missing_is_a_clear_error(tmp_path, xyz):
    with pytest.raises(ValueError, match="pip install tensorboard"):
        train(_cfg(tmp_path, xyz, epochs=1, tensorboard=True), log=lambda m: None)
