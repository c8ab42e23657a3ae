"""Training runs when things go wrong (issue 16): the run folder is the folder given, one run per
folder, non-finite or diverged weights never saved, no validation set, options a resume cannot
honour, label / stress-unit / overlap checks, unreadable and unwritable checkpoints.

Each test reproduces one case of the issue with a tiny model on a tiny extxyz set (CPU)."""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastchgnet.train import TrainConfig, Trainer, train
from test_trainer import _cfg, _write_extxyz

MLEARN = Path(__file__).resolve().parents[2] / "shared" / "data" / "mlearn"


@pytest.fixture(scope="module")
def xyz(tmp_path_factory) -> Path:
    return _write_extxyz(tmp_path_factory.mktemp("data") / "toy.xyz")


def _quiet(msg: str) -> None:
    pass


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _all_finite(path: Path) -> bool:
    return all(torch.isfinite(v).all() for v in _ckpt(path)["state_dict"].values()
               if torch.is_floating_point(v))


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def _at_step(step: int, action):
    """A step callback that calls ``action(trainer)`` once, after optimiser step ``step``."""
    def callback(trainer: Trainer) -> None:
        if trainer.step == step:
            action(trainer)
    return callback


# ------------------------------------------------------------------------------------------------
# case 1: --resume writes to --out


def test_resume_of_a_copied_run_writes_to_the_copy_not_the_original(tmp_path, xyz):
    cfg = _cfg(tmp_path / "orig", xyz, epochs=1)
    train(cfg, log=_quiet)
    orig, copy = Path(cfg.out), tmp_path / "copy"
    shutil.copytree(orig, copy)
    before = {p.name: p.read_bytes() for p in orig.iterdir() if p.is_file()}
    train(TrainConfig(out=str(copy), epochs=2, resume=True, device="cpu", progress=False), log=_quiet)
    after = {p.name: p.read_bytes() for p in orig.iterdir() if p.is_file()}
    assert after == before  # the original run is untouched
    assert [r["epoch"] for r in _rows(copy)] == ["1", "2"]
    assert _ckpt(copy / "last.pt")["trainer"]["epoch"] == 2
    assert json.loads((copy / "test.json").read_text())["checkpoint"] == str(copy / "best.pt")


def test_resume_from_another_working_directory(tmp_path, xyz, monkeypatch):
    """A run started with a relative --out is resumed from elsewhere by its absolute path."""
    monkeypatch.chdir(tmp_path)
    train(_cfg(tmp_path, xyz, epochs=1, out="ref"), log=_quiet)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    train(TrainConfig(out=str(tmp_path / "ref"), epochs=2, resume=True, device="cpu", progress=False),
          log=_quiet)
    assert [r["epoch"] for r in _rows(tmp_path / "ref")] == ["1", "2"]
    assert not (elsewhere / "ref").exists()


# ------------------------------------------------------------------------------------------------
# case 2: non-finite weights are never saved over finite ones


def _poison(trainer: Trainer) -> None:
    with torch.no_grad():
        dict(trainer.model.named_parameters())["site_wise.weight"].fill_(float("nan"))


def test_nan_with_checkpoint_every_keeps_the_finite_last_pt_and_says_so(tmp_path, xyz):
    cfg = _cfg(tmp_path, xyz, epochs=3, checkpoint_every=1)
    out = Path(cfg.out)
    with pytest.raises(FloatingPointError) as info:
        train(cfg, log=_quiet, callbacks=[_at_step(5, _poison)])  # NaN from step 6 on
    msg = str(info.value)
    state = _ckpt(out / "last.pt")["trainer"]
    assert _all_finite(out / "last.pt") and _all_finite(out / "best.pt")
    assert state["step"] == 5 and f"last.pt holds step {state['step']}" in msg, msg  # true
    assert "nan" in msg and "epoch 2, step 6" in msg
    assert not (out / "run.lock").exists()  # released on error
    # the run resumes from that checkpoint
    train(TrainConfig(out=str(out), epochs=3, resume=True, device="cpu", progress=False), log=_quiet)
    assert _ckpt(out / "last.pt")["trainer"]["epoch"] == 3 and _all_finite(out / "last.pt")


# ------------------------------------------------------------------------------------------------
# case 4: one run per folder


def test_a_second_run_on_a_folder_in_use_fails_at_once_naming_the_owner(tmp_path, xyz):
    from fastchgnet.train import RunFolderLockedError

    cfg = _cfg(tmp_path, xyz, epochs=1)
    out = Path(cfg.out)
    errors: list[BaseException] = []

    def second_run(trainer: Trainer) -> None:  # while the first run owns the folder
        try:
            train(_cfg(tmp_path, xyz, epochs=1, lr=5e-3), log=_quiet)
        except RunFolderLockedError as exc:
            errors.append(exc)

    train(cfg, log=_quiet, callbacks=[_at_step(1, second_run)])
    assert len(errors) == 1, "the second run was not refused"
    msg = str(errors[0])
    assert str(out) in msg and f"pid {os.getpid()}" in msg, msg
    assert not (out / "run.lock").exists()  # released at the end
    assert len(_rows(out)) == 1  # one run's metrics only


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, xyz):
    cfg = _cfg(tmp_path, xyz, epochs=1)
    out = Path(cfg.out)
    # a process that takes the lock and dies without releasing it (as under SIGKILL)
    code = ("import os, sys; from fastchgnet.train.run_lock import RunLock; "
            "RunLock(sys.argv[1]).acquire(); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(out)], check=True)
    dead = json.loads((out / "run.lock").read_text())["pid"]
    logs: list[str] = []
    train(cfg, log=logs.append)
    assert any("stale lock" in m and f"pid {dead}" in m for m in logs), logs
    assert "stale lock" in (out / "train.log").read_text()
    assert not (out / "run.lock").exists()


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
    from fastchgnet.train.run_lock import RunFolderLockedError, RunLock

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "run.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "time": 0}))
    with pytest.raises(RunFolderLockedError, match="elsewhere.example.*delete"):
        RunLock(folder).acquire()
    assert (folder / "run.lock").exists()
    # two locks in one process: the second fails, the first is released cleanly
    other = tmp_path / "other"
    first = RunLock(other).acquire()
    with pytest.raises(RunFolderLockedError, match=str(os.getpid())):
        RunLock(other).acquire()
    first.release()
    assert not (other / "run.lock").exists()
    RunLock(other).acquire().release()


# ------------------------------------------------------------------------------------------------
# case 5: no validation data


def test_without_validation_data_best_pt_is_the_last_epoch_and_says_so(tmp_path, xyz):
    cfg = _cfg(tmp_path, xyz, epochs=2, split=(0.9, 0.0, 0.1))
    out = Path(cfg.out)
    logs: list[str] = []
    result = train(cfg, log=logs.append)
    assert sum("no validation set" in m and "WARNING" in m for m in logs) == 1, logs  # once, loud
    best, last = _ckpt(out / "best.pt"), _ckpt(out / "last.pt")
    assert best["epoch"] == 2 and best["selected_by"] == "last_epoch"
    assert all(torch.equal(best["state_dict"][k], last["state_dict"][k]) for k in best["state_dict"])
    test = json.loads((out / "test.json").read_text())
    assert "no validation set: best.pt = last epoch" in test["best"]["note"]
    assert result["best"]["epoch"] == 2
    assert any("no validation set: best.pt = last epoch" in m for m in logs)


# ------------------------------------------------------------------------------------------------
# case 6: divergence


def _explode(trainer: Trainer) -> None:
    """Energies off by 1e6 eV/atom from here on (the AtomRef does not train): a finite loss that
    grows by orders of magnitude, as a run with too high a learning rate."""
    with torch.no_grad():
        trainer.model.atom_ref.add_(1e6)


def test_a_diverging_run_stops_naming_the_epoch_and_loss_and_keeps_the_good_checkpoints(tmp_path, xyz):
    from fastchgnet.train import TrainingDivergedError

    cfg = _cfg(tmp_path, xyz, epochs=3)
    out = Path(cfg.out)
    with pytest.raises(TrainingDivergedError) as info:
        train(cfg, log=_quiet, callbacks=[_at_step(5, _explode)])
    msg = str(info.value)
    assert "epoch 2" in msg and "diverged" in msg and "1000 x the best epoch" in msg, msg
    loss = float(msg.split("training loss is ")[1].split(",")[0])
    assert loss > 1e4
    assert _ckpt(out / "last.pt")["trainer"]["epoch"] == 1 and _ckpt(out / "best.pt")["epoch"] == 1
    assert [r["epoch"] for r in _rows(out)] == ["1"]  # no row of the diverged epoch
    assert not (out / "test.json").exists()


def test_the_cli_exits_non_zero_on_divergence_and_failed_writes(tmp_path, monkeypatch, capsys):
    import fastchgnet.cli.train as cli_train
    from fastchgnet.cli import main
    from fastchgnet.train import CheckpointWriteError, TrainingDivergedError

    for exc in (TrainingDivergedError("epoch 3, step 12: the training diverged"),
                CheckpointWriteError("could not write x/last.pt: No space left on device")):
        def fail(*a, exc=exc, **k):
            raise exc
        monkeypatch.setattr(cli_train, "train", fail)
        assert main(["train", "--out", str(tmp_path / "x"), "--device", "cpu"]) == 1
        assert str(exc) in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# case 8: options a resume cannot honour


def test_resume_with_a_changed_option_is_an_error_naming_it(tmp_path, xyz):
    cfg = _cfg(tmp_path, xyz, epochs=1)
    train(cfg, log=_quiet)
    base = dict(out=cfg.out, epochs=2, resume=True, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"--batch-size 8 \(the run has 4\)"):
        train(TrainConfig(**base, batch_size=8), log=_quiet)
    with pytest.raises(ValueError, match=r"--lr 0\.01 .* has 0\.001"):
        train(**base, lr=1e-2, log=_quiet)
    with pytest.raises(ValueError, match=r"--model heads .* has exact"):
        train(TrainConfig(**base, model="heads"), log=_quiet)
    other = _write_extxyz(tmp_path / "other.xyz", n=20, seed=5)
    with pytest.raises(ValueError, match=r"--data .*other\.xyz"):
        train(TrainConfig(**base, data=str(other)), log=_quiet)
    assert _ckpt(Path(cfg.out) / "last.pt")["trainer"]["epoch"] == 1  # nothing ran
    # the same dataset at another path is fine (a moved run pointing at its data again)
    moved = tmp_path / "moved.xyz"
    shutil.copy(xyz, moved)
    train(TrainConfig(**base, data=str(moved)), log=_quiet)
    assert _ckpt(Path(cfg.out) / "last.pt")["trainer"]["epoch"] == 2


def test_resume_takes_the_options_not_given_from_the_run_and_out_from_the_call(tmp_path):
    from fastchgnet.train.resume import resume_config

    saved = TrainConfig(epochs=30, batch_size=4, cache="/scratch/c", workers=2, checkpoint_every=50,
                        progress=False, out="/old/place").to_dict()
    last = tmp_path / "new" / "last.pt"
    cfg = resume_config(TrainConfig(out=str(tmp_path / "new"), resume=True), saved, {"out", "resume"},
                        last)
    assert (cfg.out, cfg.epochs, cfg.batch_size, cfg.cache, cfg.workers, cfg.checkpoint_every,
            cfg.progress) == (str(tmp_path / "new"), 30, 4, "/scratch/c", 2, 50, False)
    cfg = resume_config(TrainConfig(out="x", resume=True, epochs=40, workers=0, batch_size=4),
                        saved, {"out", "resume", "epochs", "workers", "batch_size"}, last)
    assert (cfg.out, cfg.epochs, cfg.workers, cfg.batch_size) == ("x", 40, 0, 4)
    with pytest.raises(ValueError, match=r"--weights e=1,f=1,s=0,m=0 \(the run has e=2,f=1.5,s=0.1,m=0.1\)"):
        resume_config(TrainConfig(prefactors={"e": 1.0, "f": 1.0, "s": 0.0, "m": 0.0}), saved,
                      {"prefactors"}, last)
    with pytest.raises(FileNotFoundError, match="--data"):
        resume_config(TrainConfig(), {**saved, "data": "relative/elsewhere.xyz"}, set(), last)


def test_cli_resume_tells_a_flag_given_from_a_default(tmp_path, xyz, capsys):
    from fastchgnet.cli import main

    cfg = _cfg(tmp_path, xyz, epochs=1)
    train(cfg, log=_quiet)
    common = ["train", "--out", cfg.out, "--resume", "--device", "cpu", "--no-progress", "--epochs", "2"]
    # 16 is the default batch size: given explicitly, it still differs from the run's 4
    assert main([*common, "--batch-size", "16"]) == 1
    err = capsys.readouterr().err
    assert "--batch-size 16" in err and "has 4" in err, err
    assert main([*common, "--batch-size", "4", "--lr", "1e-3"]) == 0  # the run's own values
    state = _ckpt(Path(cfg.out) / "last.pt")["trainer"]
    assert state["epoch"] == 2 and state["step"] == 8  # batch 4 kept: 4 steps per epoch


# ------------------------------------------------------------------------------------------------
# case 9: label counts, stress units, train/test overlap


def _write_frames(path: Path, n: int, *, stress_scale: float | None = 0.01, twins: bool = False,
                  seed: int = 0) -> Path:
    """extxyz frames with energy, forces and (unless ``stress_scale`` is None) stress written as
    ``stress_scale``-sized numbers (read as eV/A^3). ``twins``: frame i + n/2 repeats frame i."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator
    from pymatgen.io.ase import AseAtomsAdaptor

    from fastchgnet.data.prototypes import random_structures

    rng = np.random.default_rng(seed)
    structs = list(random_structures(n // 2 if twins else n, seed=seed, max_atoms=6))
    if twins:
        structs = structs + structs
    frames = []
    for s in structs:
        atoms = AseAtomsAdaptor.get_atoms(s)
        kw = dict(energy=-3.0 * len(atoms), forces=rng.normal(0, 0.3, (len(atoms), 3)))
        if stress_scale is not None:
            kw["stress"] = rng.normal(0, stress_scale, 6)
        atoms.calc = SinglePointCalculator(atoms, **kw)
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")
    return path


def test_training_warns_about_a_label_missing_in_every_frame(tmp_path):
    data = _write_frames(tmp_path / "nostress.xyz", 12, stress_scale=None)
    logs: list[str] = []
    train(_cfg(tmp_path, data, epochs=1), log=logs.append)
    assert any("labels of the" in m and "stress 0" in m for m in logs), logs
    assert any(m.startswith("WARNING: no training frame has a stress label") and "0.1" in m
               for m in logs), logs
    test = json.loads((tmp_path / "run" / "test.json").read_text())
    assert test["data_checks"]["labels"]["s"] == 0


def test_training_warns_about_stress_labels_in_the_wrong_unit(tmp_path):
    # stresses of a few GPa written as GPa numbers, read as eV/A^3: 160x too large
    data = _write_frames(tmp_path / "gpa.xyz", 12, stress_scale=3.0)
    logs: list[str] = []
    train(_cfg(tmp_path, data, epochs=1), log=logs.append)
    assert any(m.startswith("WARNING: the stress labels look too large") and "kBar" in m
               for m in logs), logs


def test_the_stress_unit_check_passes_the_mlearn_sets_and_flags_them_in_kbar():
    from fastchgnet.data.readers import read_dataset
    from fastchgnet.train.data_checks import STRESS_HIGH_GPA, stress_scale, stress_unit_warning

    assert stress_unit_warning(None) is None
    assert stress_unit_warning(2.0) is None
    assert "too small" in stress_unit_warning(0.0)
    files = sorted(MLEARN.glob("*/*.json"))
    if not files:
        pytest.skip("shared mlearn data absent")
    for f in files:
        s = np.array([x.stress for x in read_dataset(f) if x.stress is not None])
        scale = stress_scale(s)
        assert stress_unit_warning(scale) is None, (f, scale)
        if scale * 10 > STRESS_HIGH_GPA:  # kBar read as GPa: caught where stresses are large
            assert "too large" in stress_unit_warning(scale * 10)
        assert "too large" in stress_unit_warning(scale * 160), f  # GPa read as eV/A^3


def test_training_counts_the_frames_shared_by_train_and_test(tmp_path):
    data = _write_frames(tmp_path / "twins.xyz", 24, twins=True)
    logs: list[str] = []
    train(_cfg(tmp_path, data, epochs=1, split=(0.5, 0.25, 0.25)), log=logs.append)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    train_ids = set(split["train"])
    twin = {i: (i + 12) % 24 for i in range(24)}
    want_test = sum(twin[i] in train_ids for i in split["test"])
    want_val = sum(twin[i] in train_ids for i in split["val"])
    assert want_test + want_val > 0
    assert any(f"WARNING: {want_test} of the 6 test frames and {want_val} of the 6 validation" in m
               for m in logs), logs
    test = json.loads((tmp_path / "run" / "test.json").read_text())
    assert test["data_checks"]["shared_with_train"] == {"test": want_test, "val": want_val}


# ------------------------------------------------------------------------------------------------
# case 11: unreadable last.pt, failed writes


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_resume_from_a_damaged_last_pt_names_the_file_and_what_to_do(tmp_path, xyz, damage):
    from fastchgnet.cli import main

    cfg = _cfg(tmp_path, xyz, epochs=1)
    train(cfg, log=_quiet)
    last = Path(cfg.out) / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(ValueError, match="last.pt cannot be read.*truncated or corrupt.*--init") as info:
        train(TrainConfig(out=cfg.out, epochs=2, resume=True, device="cpu", progress=False), log=_quiet)
    assert str(last) in str(info.value)
    if damage == "empty":
        assert "empty" in str(info.value)
    assert main(["train", "--out", cfg.out, "--resume", "--device", "cpu", "--epochs", "2"]) == 1
    assert not (Path(cfg.out) / "run.lock").exists()


@pytest.mark.parametrize("failure", ["torch", "os"])
def test_a_failed_checkpoint_write_names_the_file_and_keeps_the_previous_one(tmp_path, xyz, monkeypatch,
                                                                              failure):
    from fastchgnet.train import CheckpointWriteError

    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        if hasattr(f, "write"):  # a partial temporary file, as a full disk leaves
            f.write(b"PK\x03\x04partial")
        else:
            Path(f).write_bytes(b"PK\x03\x04partial")
        if failure == "torch":
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 128 vs 64")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fill_disk(trainer: Trainer) -> None:
        monkeypatch.setattr(torch, "save", disk_full)

    cfg = _cfg(tmp_path, xyz, epochs=2, checkpoint_every=1)
    out = Path(cfg.out)
    try:
        with pytest.raises(CheckpointWriteError) as info:
            train(cfg, log=_quiet, callbacks=[_at_step(2, fill_disk)])
    finally:
        monkeypatch.setattr(torch, "save", real_save)
    msg = str(info.value)
    assert f"could not write {out / 'last.pt'}" in msg and "intact" in msg and "step 2" in msg, msg
    if failure == "os":
        assert "No space left on device" in msg
    else:
        assert "inline_container" in msg
    assert _ckpt(out / "last.pt")["trainer"]["step"] == 2 and _all_finite(out / "last.pt")
    assert not list(out.glob("*.tmp")) and not (out / "run.lock").exists()
    assert math.isfinite(_ckpt(out / "last.pt")["trainer"]["epoch_loss"].item())
