"""The moving average of the weights (``ema_decay``): the update rule, the swap, checkpoints and
an exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fastchgnet.train.ema import EMA
from fastchgnet.train import TrainConfig, train

from test_trainer import _cfg, _write_extxyz, stop_at


@pytest.fixture(scope="module")
def xyz(tmp_path_factory) -> Path:
    return _write_extxyz(tmp_path_factory.mktemp("data") / "toy.xyz")


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    net[1].bias.requires_grad_(False)  # frozen: not averaged
    return net


def test_update_follows_the_warmed_up_decay():
    net = _net()
    ema = EMA(net, 0.9)
    assert ema.names == ["0.weight", "0.bias", "1.weight"]
    expect = [p.detach().clone() for p in ema.params]
    for n in range(1, 100):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        rate = min(0.9, (1 + n) / (10 + n))
        assert ema.rate() == pytest.approx(rate)
        ema.update()
        expect = [rate * e + (1 - rate) * p.detach() for e, p in zip(expect, ema.params)]
        for e, s in zip(expect, ema.shadow):
            torch.testing.assert_close(s, e, rtol=1e-12, atol=1e-12)
    assert ema.num_updates == 99 and ema.rate() == 0.9  # the warm-up ends at n = 80


def test_applied_swaps_the_average_in_and_restores_the_raw_weights():
    net = _net()
    ema = EMA(net, 0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    raw = {k: v.clone() for k, v in net.state_dict().items()}
    ema.update()
    with ema.applied():
        for name, s in zip(ema.names, ema.shadow):
            assert torch.equal(net.state_dict()[name], s)
        assert torch.equal(net.state_dict()["1.bias"], raw["1.bias"])  # frozen, untouched
        assert not torch.equal(net.state_dict()["0.weight"], raw["0.weight"])
    for k, v in net.state_dict().items():
        assert torch.equal(v, raw[k]), k


def test_state_round_trip_and_clear_errors():
    net = _net()
    ema = EMA(net, 0.99)
    ema.update()
    other = EMA(_net(), 0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.99 and other.num_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    with pytest.raises(ValueError, match="must be in"):
        EMA(net, 1.0)
    with pytest.raises(ValueError, match="trainable parameters"):
        EMA(nn.Linear(3, 4).double(), 0.9).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=0.0)


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_best_checkpoint_holds_the_average_and_last_the_raw_weights(tmp_path, xyz):
    cfg = _cfg(tmp_path, xyz, epochs=1, ema_decay=0.9)
    train(cfg, log=lambda m: None)
    last, best = _ckpt(Path(cfg.out) / "last.pt"), _ckpt(Path(cfg.out) / "best.pt")
    ema = last["trainer"]["ema"]
    assert ema["num_updates"] == last["trainer"]["step"] == 4 and best["ema_decay"] == 0.9
    names = set(ema["names"])
    assert names and names <= set(best["state_dict"])
    for name, shadow in zip(ema["names"], ema["shadow"]):
        assert torch.equal(best["state_dict"][name], shadow), name
    moved = [n for n in ema["names"] if not torch.equal(last["state_dict"][n], best["state_dict"][n])]
    assert moved  # raw and averaged weights differ
    for name, v in last["state_dict"].items():  # buffers (AtomRef, ...) are the model's own
        if name not in names:
            assert torch.equal(best["state_dict"][name], v), name


def test_resume_with_ema_equals_an_uninterrupted_run(tmp_path, xyz):
    cache = str(tmp_path / "cache")
    ref = _cfg(tmp_path / "a", xyz, epochs=2, ema_decay=0.8, cache=cache)
    train(ref, log=lambda m: None)
    cut = _cfg(tmp_path / "b", xyz, epochs=2, ema_decay=0.8, cache=cache, checkpoint_every=1)
    assert train(cut, log=lambda m: None, callbacks=[stop_at(5)]) == {}
    train(TrainConfig(out=cut.out, epochs=2, resume=True, device="cpu", progress=False),
          log=lambda m: None)
    a, b = _ckpt(Path(ref.out) / "last.pt"), _ckpt(Path(cut.out) / "last.pt")
    for x, y in zip(a["trainer"]["ema"]["shadow"], b["trainer"]["ema"]["shadow"]):
        assert torch.equal(x, y)
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    ba, bb = _ckpt(Path(ref.out) / "best.pt"), _ckpt(Path(cut.out) / "best.pt")
    assert ba["epoch"] == bb["epoch"]
    for k in ba["state_dict"]:
        assert torch.equal(ba["state_dict"][k], bb["state_dict"][k]), k
