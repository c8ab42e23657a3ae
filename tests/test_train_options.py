"""Run options of ``fastchgnet train`` (issue 18, part 4): YAML/JSON config files and their CLI
overrides, TensorBoard events, early stopping; the in-process graph build of small sources; the
helpers of the fine-tuning time-to-accuracy benchmark."""

from __future__ import annotations

import builtins
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastchgnet.train import TrainConfig, Trainer, train

from test_trainer import TINY, _cfg, _write_extxyz


@pytest.fixture(scope="module")
def xyz(tmp_path_factory) -> Path:
    return _write_extxyz(tmp_path_factory.mktemp("data") / "toy.xyz", n=12)


def _parse(argv: list[str]) -> dict:
    from fastchgnet.cli import build_parser
    from fastchgnet.cli.train import options_with_file

    return options_with_file(build_parser().parse_args(["train", *argv]))


# ------------------------------------------------------------------------------------------------
# config files


def test_yaml_config_round_trip_cli_override_and_saved_config(tmp_path, xyz):
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (YAML config files need it)")
    from fastchgnet.cli import main

    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({
        "data": str(xyz), "model_config": TINY, "batch-size": 4, "epochs": 3, "lr": 1e-3,
        "split": "0.8,0.1,0.1", "weights": [1, 1, 0.1, 0], "cache": str(tmp_path / "cache"),
        "cache-workers": 1, "no-progress": True, "no_plots": True, "device": "cpu", "seed": 3}))
    flags = ["--config", str(run), "--epochs", "1", "--lr", "2e-3", "--seed", "5"]
    opts = _parse(flags)
    assert (opts["epochs"], opts["lr"], opts["seed"]) == (1, 2e-3, 5)  # flags override the file
    assert opts["batch_size"] == 4 and opts["prefactors"] == {"e": 1, "f": 1, "s": 0.1, "m": 0}
    assert opts["split"] == (0.8, 0.1, 0.1) and opts["plots"] is False and opts["device"] == "cpu"

    out = tmp_path / "a"
    assert main(["train", *flags, "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())  # the effective options of the run
    assert saved == TrainConfig(**{**opts, "out": str(out)}).to_dict()
    # the saved config, as YAML, is a config file giving back the same run (but --out)
    again = tmp_path / "again.yml"
    again.write_text(yaml.safe_dump(saved))
    back = _parse(["--config", str(again), "--out", str(tmp_path / "b")])
    assert TrainConfig(**back).to_dict() == {**saved, "out": str(tmp_path / "b")}
    # a flag given with its default value still overrides the file
    assert _parse(["--config", str(again), "--seed", "0"])["seed"] == 0


def test_config_file_errors_name_the_file_and_option(tmp_path):
    from fastchgnet.train.config_file import config_fields, read_config_file

    bad_key = tmp_path / "k.json"
    bad_key.write_text(json.dumps({"batch-sise": 4}))
    with pytest.raises(ValueError, match="unknown option 'batch-sise'"):
        config_fields(read_config_file(bad_key), source=str(bad_key))
    not_json = tmp_path / "n.json"
    not_json.write_text("{batch-size: 4")
    with pytest.raises(ValueError, match="n.json: not valid JSON"):
        read_config_file(not_json)
    with pytest.raises(ValueError, match="weights needs 4 numbers"):
        config_fields({"weights": "1,2"})
    pytest.importorskip("yaml")
    not_yaml = tmp_path / "y.yaml"
    not_yaml.write_text("epochs: [1, 2\n")
    with pytest.raises(ValueError, match="y.yaml: not valid YAML"):
        read_config_file(not_yaml)
    listed = tmp_path / "l.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        read_config_file(listed)


def test_yaml_without_pyyaml_says_what_to_install(tmp_path, monkeypatch):
    from fastchgnet.train.config_file import read_config_file

    real_import = builtins.__import__

    def no_yaml(name, *args, **kw):
        if name == "yaml":
            raise ImportError("No module named 'yaml'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_yaml)
    f = tmp_path / "run.yaml"
    f.write_text("epochs: 2\n")
    with pytest.raises(ValueError, match="pip install pyyaml"):
        read_config_file(f)


# ------------------------------------------------------------------------------------------------
# TensorBoard


def test_tensorboard_event_file_holds_the_epoch_metrics(tmp_path, xyz):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, xyz, epochs=2, tensorboard=True)
    train(cfg, log=lambda m: None)
    events = list((Path(cfg.out) / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(Path(cfg.out) / "tensorboard"))
    acc.Reload()
    with open(Path(cfg.out) / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    for key in ("train_loss", "val_loss", "val_e_mae", "lr"):
        got = acc.Scalars(key)
        assert [e.step for e in got] == [1, 2]
        np.testing.assert_allclose([e.value for e in got], [float(r[key]) for r in rows], rtol=1e-5)
    assert "val_m_mae" not in acc.Tags()["scalars"]  # no magmom labels: NaN, not written


def test_tensorboard_missing_is_a_clear_error_before_any_work(tmp_path, xyz, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kw):
        if name.startswith("torch.utils.tensorboard") or name == "tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    cfg = _cfg(tmp_path, xyz, epochs=1, tensorboard=True)
    with pytest.raises(ValueError, match=r"--tensorboard needs the tensorboard package.*pip install "
                                         r"tensorboard"):
        train(cfg, log=lambda m: None)
    assert not (Path(cfg.out) / "split.json").exists()  # stopped before the data and the model
    from fastchgnet.cli import main

    assert main(["train", "--data", str(xyz), "--tensorboard", "--out", str(tmp_path / "cli"),
                 "--cache", str(tmp_path / "cache"), "--no-progress"]) == 1


# ------------------------------------------------------------------------------------------------
# early stopping


def test_early_stopping_stops_and_best_pt_holds_the_best_epoch(tmp_path, xyz, monkeypatch):
    """Validation losses 1.0, 0.5, 0.7, 0.9, ... with --patience 2: stops after epoch 4; best.pt
    is epoch 2's model (not the last one)."""
    losses = iter([1.0, 0.5, 0.7, 0.9, 1.1, 1.3])
    weights: dict[int, dict[str, torch.Tensor]] = {}
    real_validate = Trainer.validate

    def validate(self):
        real_validate(self)
        weights[self.epoch + 1] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return {"loss": next(losses), "e_mae": 0.1, "f_mae": 0.1, "s_mae": 0.1, "m_mae": 0.1, "n": 2}

    monkeypatch.setattr(Trainer, "validate", validate)
    logs: list[str] = []
    cfg = _cfg(tmp_path, xyz, epochs=6, patience=2)
    train(cfg, log=logs.append)
    out = Path(cfg.out)
    with open(out / "metrics.csv") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2, 3, 4]
    assert any(m.startswith("early stop after epoch 4") and "--patience 2" in m for m in logs), logs
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == 2 and best["selected_by"] == "val_loss"
    for k, v in weights[2].items():
        torch.testing.assert_close(best["state_dict"][k], v)
    assert torch.load(out / "last.pt", weights_only=True)["trainer"]["epoch"] == 4
    assert json.loads((out / "test.json").read_text())["best"]["epoch"] == 2


# ------------------------------------------------------------------------------------------------
# graph cache of a small source: built in this process


def test_small_source_is_built_in_process_and_read_once(tmp_path, xyz, monkeypatch):
    import fastchgnet.data.cache as cache_mod
    import fastchgnet.train.job as job

    class NoPool:
        def __init__(self, *a, **kw):
            raise AssertionError("a worker pool was started for a one-shard source")

    monkeypatch.setattr(cache_mod, "ProcessPoolExecutor", NoPool)
    reads = []
    real = job.read_dataset

    def counting(*a, **kw):
        reads.append(a[0])
        return real(*a, **kw)

    monkeypatch.setattr(job, "read_dataset", counting)
    logs: list[str] = []
    c1 = job.prepare_data(str(xyz), cache_root=tmp_path / "c", workers=2, log=logs.append)
    assert len(c1) == 12 and len(reads) == 1
    c2 = job.prepare_data(str(xyz), cache_root=tmp_path / "c", workers=2, log=logs.append)
    assert c2.path == c1.path and len(reads) == 1  # cached: the file is not read again
    assert np.array_equal(c1.energies(), c2.energies())


# ------------------------------------------------------------------------------------------------
# fine-tuning time-to-accuracy benchmark (helpers; the benchmark itself is in benchmarks/)


def test_time_to_target_and_compare():
    from fastchgnet.bench.finetune import compare, time_to_target

    curve = [{"t_s": 10.0, "val_e_mae": 30.0}, {"t_s": 20.0, "val_e_mae": 12.0},
             {"t_s": 30.0, "val_e_mae": 14.0}]
    assert time_to_target(curve, 12.0) == 20.0 and time_to_target(curve, 40.0) == 10.0
    assert time_to_target(curve, 5.0) is None
    ref = {"epochs": [{"t_s": 20.0, "val_e_mae": 25.0}, {"t_s": 40.0, "val_e_mae": 20.0}],
           "wall_s": 40.0, "test": {"e_mae": 20.0, "f_mae": 100.0, "s_mae": 0.5}}
    ours = {"epochs": curve, "wall_s": 30.0, "test": {"e_mae": 10.0, "f_mae": 90.0, "s_mae": 0.4}}
    c = compare(ours, ref)
    assert c["target_val_e_mae"] == 20.0 and c["ours_time_to_target_s"] == 20.0
    assert c["ref_time_to_target_s"] == 40.0 and c["time_to_target_ratio"] == 0.5
    assert c["e_ratio"] == 0.5 and c["f_ratio"] == 0.9 and c["wall_ratio"] == 0.75
    assert c["targets_met"] == {"energy_le_0.8": True, "force_le_1.0": True, "wall_le_0.5": False}


def test_write_split_is_seeded_disjoint_and_complete(tmp_path):
    from fastchgnet.bench.finetune import write_split

    root = tmp_path / "mlearn"
    (root / "Xx").mkdir(parents=True)
    frames = [{"i": i} for i in range(30)]
    (root / "Xx" / "training.json").write_text(json.dumps(frames))
    a = write_split("Xx", 0, tmp_path / "a", root=root)
    b = write_split("Xx", 0, tmp_path / "b", root=root)
    c = write_split("Xx", 1, tmp_path / "c", root=root)
    assert a["train_indices"] == b["train_indices"] and a["val_indices"] == b["val_indices"]
    assert a["val_indices"] != c["val_indices"] and len(a["val_indices"]) == 3
    assert sorted(a["train_indices"] + a["val_indices"]) == list(range(30))
    train_frames = json.loads(Path(a["files"]["train"]).read_text())
    assert [f["i"] for f in train_frames] == a["train_indices"]
    assert a["files"]["test"] == str(root / "Xx" / "test.json")
    assert len(write_split("Xx", 0, tmp_path / "d", root=root, limit=10)["val_indices"]) == 1
