"""Fine-tuning: the recipe chosen with and without ``init``, the AtomRef refit to the residuals of
the initial model, and what the log and test.json say."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Structure

from fastchgnet.data.cache import build_cache
from fastchgnet.data.prototypes import random_structures
from fastchgnet.data.readers import samples_from_structures
from fastchgnet.model.exact import CHGNet
from fastchgnet.model.weights import save_checkpoint
from fastchgnet.train import TrainConfig, train
from fastchgnet.train.data import GraphDataset
from fastchgnet.train.loss import DEFAULT_PREFACTORS, FINETUNE_PREFACTORS
from fastchgnet.train.model_setup import model_energies, refit_atom_ref
from fastchgnet.train.schedule import FINETUNE_LR, default_lr

from test_trainer import TINY, _cfg, _write_extxyz


@pytest.fixture(scope="module")
def xyz(tmp_path_factory) -> Path:
    return _write_extxyz(tmp_path_factory.mktemp("data") / "toy.xyz")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny model with a nonzero AtomRef, saved as a checkpoint to fine-tune from."""
    torch.manual_seed(0)
    model = CHGNet(**TINY)
    with torch.no_grad():
        model.atom_ref.copy_(torch.linspace(-4.0, -1.0, model.atom_ref.numel()))
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def test_recipe_without_init_is_eq14_and_with_init_is_finetune():
    scratch = TrainConfig(batch_size=8)
    assert scratch.learning_rate == pytest.approx(default_lr(8)) == pytest.approx(8 / 128 * 3e-4)
    assert "from scratch" in scratch.recipe() and "Eq. 14" in scratch.recipe()
    tune = TrainConfig(batch_size=8, init="0.3.0")
    assert tune.learning_rate == FINETUNE_LR == 1e-3
    assert tune.refit_atom_ref and tune.min_lr_ratio == 0.01 and tune.warmup_steps == 0
    assert "fine-tune from 0.3.0" in tune.recipe() and "lr 0.001" in tune.recipe()
    assert "AtomRef refit" in tune.recipe()
    # an explicit --lr wins in both recipes
    assert TrainConfig(batch_size=8, init="0.3.0", lr=1e-4).learning_rate == 1e-4
    assert TrainConfig(batch_size=8, lr=1e-4).learning_rate == 1e-4
    assert "kept" in TrainConfig(init="0.3.0", refit_atom_ref=False).recipe()


def test_loss_prefactors_follow_the_recipe_and_given_ones_override():
    assert FINETUNE_PREFACTORS == {"e": 2.0, "f": 3.0, "s": 0.1, "m": 0.1}
    assert DEFAULT_PREFACTORS == {"e": 2.0, "f": 1.5, "s": 0.1, "m": 0.1}
    scratch, tune = TrainConfig(), TrainConfig(init="0.3.0")
    assert scratch.loss_prefactors == scratch.stage_prefactors(0) == DEFAULT_PREFACTORS
    assert tune.loss_prefactors == tune.stage_prefactors(0) == FINETUNE_PREFACTORS
    assert "e=2, f=3, s=0.1, m=0.1 (the fine-tuning default" in tune.recipe()
    assert "e=2, f=1.5, s=0.1, m=0.1 (the FastCHGNet / CHGNet default)" in scratch.recipe()
    # a partial dict overrides what it names, on top of the recipe's
    part = TrainConfig(init="0.3.0", prefactors={"e": 1})
    assert part.loss_prefactors == {"e": 1.0, "f": 3.0, "s": 0.1, "m": 0.1}
    assert "e=1, f=3, s=0.1, m=0.1 (--weights)" in part.recipe()
    assert TrainConfig(prefactors={"f": 3}).loss_prefactors["e"] == 2.0
    # the recipe's own values, given explicitly, are still the recipe's
    assert "(the fine-tuning default" in TrainConfig(init="x", prefactors=FINETUNE_PREFACTORS).recipe()
    # round trip keeps "unset"
    assert TrainConfig.from_dict(tune.to_dict()).prefactors is None
    with pytest.raises(ValueError, match="unknown loss prefactors"):
        TrainConfig(init="0.3.0", prefactors={"q": 1.0})


def test_cli_weights_default_to_the_recipe(tmp_path):
    from fastchgnet.cli import build_parser
    from fastchgnet.cli.train import train_options

    p = build_parser()
    assert train_options(p.parse_args(["train", "--init", "0.3.0"])).get("prefactors") is None
    given = train_options(p.parse_args(["train", "--init", "0.3.0", "--weights", "1,1,0,0"]))
    assert given["prefactors"] == {"e": 1.0, "f": 1.0, "s": 0.0, "m": 0.0}
    helptext = p._subparsers._group_actions[0].choices["train"].format_help()
    assert "with --init: 2,3,0.1,0.1; from scratch: 2,1.5,0.1,0.1" in " ".join(helptext.split())


def test_atom_ref_refit_recovers_a_known_per_element_shift(tmp_path):
    """labels = initial model's energy (with its AtomRef) + known per-element offsets x counts:
    the refit returns the model's AtomRef + the offsets."""
    torch.manual_seed(1)
    model = CHGNet(**TINY).double()
    with torch.no_grad():
        model.atom_ref.copy_(torch.randn(model.atom_ref.numel(), dtype=torch.float64))
    rng = np.random.default_rng(0)
    structs = [Structure(s.lattice, list(rng.choice(["Li", "O", "Si", "Ge"], len(s))), s.frac_coords)
               for s in random_structures(30, seed=3, max_atoms=8)]
    plain = build_cache(samples_from_structures(structs, energies=[0.0] * len(structs)),
                        tmp_path / "a", source_hash="plain", workers=1)
    idx = np.arange(len(plain))
    e_model = model_energies(model, GraphDataset(plain, idx), batch_size=7)
    counts = plain.composition_counts(94)[idx].astype(np.float64)
    present = counts.sum(0) > 0
    assert np.linalg.matrix_rank(counts[:, present]) == present.sum()  # every element determined
    offsets = np.where(present, rng.normal(0, 0.5, 94), 0.0)
    ref = model.atom_ref.detach().numpy().copy()
    totals = e_model + counts @ (ref + offsets)
    labelled = build_cache(samples_from_structures(structs, energies=totals, energy_is_total=True),
                           tmp_path / "b", source_hash="labelled", workers=1)
    # the pass did not change the model: its AtomRef is back
    assert np.array_equal(model.atom_ref.detach().numpy(), ref)
    new, before, after = refit_atom_ref(labelled, idx, e_model, model.atom_ref)
    np.testing.assert_allclose(new[present], (ref + offsets)[present], atol=1e-6)
    np.testing.assert_array_equal(new[~present], ref[~present])  # absent elements kept
    assert after < 1e-8 < before


def _read_log(run: Path) -> list[str]:
    return (run / "train.log").read_text().splitlines()


def test_finetune_log_states_recipe_and_refit(tmp_path, xyz, tiny_ckpt):
    logs: list[str] = []
    cfg = _cfg(tmp_path, xyz, model_config={}, init=str(tiny_ckpt), lr=None, epochs=1)
    result = train(cfg, log=logs.append)
    assert logs[0].startswith(f"recipe: fine-tune from {tiny_ckpt}: lr 0.001"), logs[0]
    assert "prefactors e=2, f=3, s=0.1, m=0.1 (the fine-tuning default" in logs[0], logs[0]
    refit = [m for m in logs if m.startswith("AtomRef refit to the residuals")]
    assert refit and "->" in refit[0] and "meV/atom" in refit[0], logs
    assert any("lr 0.001" in m for m in logs if m.startswith("model "))
    assert "held-out 10 % of --data" in result["test_set"]
    assert any(m.startswith("MAE on held-out 10 % of --data") for m in logs), logs
    saved = json.loads((Path(cfg.out) / "test.json").read_text())
    assert "held-out" in saved["test_set"]
    # the run's config and checkpoints hold the prefactors it trained with, not "the default"
    assert json.loads((Path(cfg.out) / "config.json").read_text())["prefactors"] == FINETUNE_PREFACTORS
    ckpt = torch.load(Path(cfg.out) / "last.pt", weights_only=False)
    assert ckpt["trainer"]["train_config"]["prefactors"] == FINETUNE_PREFACTORS
    before = torch.load(tiny_ckpt, weights_only=True)["state_dict"]["atom_ref"]
    after = torch.load(Path(cfg.out) / "best.pt", weights_only=True)["state_dict"]["atom_ref"]
    assert not torch.equal(before, after)


def test_finetune_without_refit_keeps_atom_ref(tmp_path, xyz, tiny_ckpt):
    logs: list[str] = []
    cfg = _cfg(tmp_path, xyz, model_config={}, init=str(tiny_ckpt), refit_atom_ref=False, epochs=1)
    train(cfg, log=logs.append)
    assert any("AtomRef of" in m and "kept" in m for m in logs), logs
    before = torch.load(tiny_ckpt, weights_only=True)["state_dict"]["atom_ref"]
    after = torch.load(Path(cfg.out) / "best.pt", weights_only=True)["state_dict"]["atom_ref"]
    assert torch.equal(before, after)


def test_scratch_log_states_eq14(tmp_path, xyz):
    logs: list[str] = []
    train(_cfg(tmp_path, xyz, lr=None, epochs=1), log=logs.append)
    assert logs[0].startswith("recipe: from scratch: Eq. 14 lr = 4/128 x 3e-4"), logs[0]
    assert "prefactors e=2, f=1.5, s=0.1, m=0.1" in logs[0], logs[0]


def test_cli_no_refit_atomref_flag(tmp_path):
    from fastchgnet.cli import build_parser
    from fastchgnet.cli.train import train_options

    p = build_parser()
    assert train_options(p.parse_args(["train", "--init", "0.3.0"])).get("refit_atom_ref") is None
    assert train_options(p.parse_args(["train", "--no-refit-atomref"]))["refit_atom_ref"] is False
