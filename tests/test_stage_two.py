"""Stage two of a training run (``stage_two_start``): other loss prefactors and a constant
learning rate for the last epochs, best.pt chosen within stage two, and an exact resume."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from fastchgnet.train.schedule import WarmupCosine
from fastchgnet.train import TrainConfig, train

from test_trainer import _cfg, _write_extxyz, stop_at


@pytest.fixture(scope="module")
def xyz(tmp_path_factory) -> Path:
    return _write_extxyz(tmp_path_factory.mktemp("data") / "toy.xyz")


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_schedule_is_constant_from_the_switch_and_round_trips():
    lam = WarmupCosine(total_steps=10, warmup_steps=2, min_lr_ratio=0.1, const_from=6, const_ratio=0.25)
    plain = WarmupCosine(total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert [lam(t) for t in range(6)] == [plain(t) for t in range(6)]
    assert [lam(t) for t in range(6, 14)] == [0.25] * 8
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    fresh = torch.optim.lr_scheduler.LambdaLR(torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0),
                                              WarmupCosine(total_steps=10))
    fresh.load_state_dict(sched.state_dict())
    assert fresh.lr_lambdas[0](7) == 0.25
    with pytest.raises(ValueError, match="const_ratio"):
        WarmupCosine(10, const_from=3, const_ratio=0.0)


def test_config_errors_name_the_option():
    with pytest.raises(ValueError, match="need stage_two_start"):
        TrainConfig(stage_two_lr=1e-4)
    with pytest.raises(ValueError, match=r"stage_two_start must be in \[0, epochs=10\)"):
        TrainConfig(epochs=10, stage_two_start=10)
    with pytest.raises(ValueError, match="unknown stage-two loss prefactors"):
        TrainConfig(epochs=10, stage_two_start=5, stage_two_prefactors={"q": 1.0})
    with pytest.raises(ValueError, match="'e' must be finite"):
        TrainConfig(epochs=10, stage_two_start=5, stage_two_prefactors={"e": -1.0})
    cfg = TrainConfig(epochs=10, prefactors={"e": 3, "f": 1, "s": 0.1, "m": 0.1}, stage_two_start=4,
                      stage_two_prefactors={"e": 30})
    assert cfg.stage_prefactors(3)["e"] == 3
    assert cfg.stage_prefactors(4) == {"e": 30, "f": 1, "s": 0.1, "m": 0.1}
    assert TrainConfig.from_dict(cfg.to_dict()).stage_prefactors(9)["e"] == 30


def test_stage_two_switches_weights_and_lr_and_keeps_the_best_of_stage_two(tmp_path, xyz):
    logs: list[str] = []
    # a huge stage-two energy weight makes every stage-two validation loss larger than
    # stage one's: best.pt comes from stage two only because the best loss is forgotten
    cfg = _cfg(tmp_path, xyz, epochs=3, stage_two_start=1, stage_two_prefactors={"e": 1000.0},
               stage_two_lr=2e-4)
    train(cfg, log=logs.append)
    assert any("stage two from epoch 2: prefactors e=1000, f=1.5, s=0.1, m=0.1, constant lr 2.00e-04"
               in m for m in logs), logs
    with open(Path(cfg.out) / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["lr"]) for r in rows[1:]] == pytest.approx([2e-4, 2e-4])
    assert float(rows[0]["val_loss"]) < min(float(r["val_loss"]) for r in rows[1:])
    assert _ckpt(Path(cfg.out) / "best.pt")["epoch"] >= 2


@pytest.mark.parametrize("cut", [3, 5, 7], ids=["in-stage-one", "first-step-of-stage-two", "inside-stage-two"])
def test_resume_across_stage_two_equals_an_uninterrupted_run(tmp_path, xyz, cut):
    cache = str(tmp_path / "cache")
    kw = dict(epochs=3, stage_two_start=1, stage_two_prefactors={"e": 20.0}, stage_two_lr=3e-4, cache=cache)
    ref = _cfg(tmp_path / "a", xyz, **kw)
    train(ref, log=lambda m: None)
    part = _cfg(tmp_path / "b", xyz, checkpoint_every=1, **kw)
    assert train(part, log=lambda m: None, callbacks=[stop_at(cut)]) == {}
    train(TrainConfig(out=part.out, epochs=3, resume=True, device="cpu", progress=False),
          log=lambda m: None)
    for name in ("last.pt", "best.pt"):
        a, b = _ckpt(Path(ref.out) / name), _ckpt(Path(part.out) / name)
        assert a.get("epoch") == b.get("epoch"), name
        for k in a["state_dict"]:
            assert torch.equal(a["state_dict"][k], b["state_dict"][k]), (name, k)
