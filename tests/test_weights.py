"""Loading and saving weights."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import fastchgnet
from fastchgnet.data.prototypes import make
from fastchgnet.model.weights import chgnet_weight_file
from conftest import max_abs, small_config

STRUCTS = [make("rocksalt", ["Na", "Cl"], rattle=0.04, seed=1),
           make("perovskite", ["Sr", "Ti", "O"], rattle=0.04, seed=2)]


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def test_pretrained_loads_in_eval_mode(model):
    assert isinstance(model, fastchgnet.CHGNet)
    assert not model.training
    assert model.version == "0.3.0"
    assert next(model.parameters()).dtype == torch.float32
    assert model.n_params == 412_525


def test_checkpoint_round_trip(model, tmp_path):
    path = fastchgnet.save_checkpoint(model, tmp_path / "sub" / "model.pt")
    assert path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # atomic write
    loaded = fastchgnet.load_model(path)
    assert_same_state(model, loaded)
    assert loaded.config == model.config
    assert loaded.version == model.version
    assert not loaded.training
    a = model.predict(STRUCTS, task="efsm")
    b = loaded.predict(STRUCTS, task="efsm")
    for x, y in zip(a, b):
        for k in "efsm":
            # identical weights and inputs; float32 CPU gradient accumulation is thread-order
            # dependent, hence rounding-level tolerance on f and s
            assert max_abs(x[k], y[k]) <= (1e-4 if k == "s" else 1e-6), k
    e_a = model.predict(STRUCTS, task="e")
    e_b = loaded.predict(STRUCTS, task="e")
    for x, y in zip(e_a, e_b):
        np.testing.assert_array_equal(x["e"], y["e"])


def test_checkpoint_round_trip_float64_and_str_path(model64, tmp_path):
    path = tmp_path / "m64.pt"
    fastchgnet.save_checkpoint(model64, str(path))
    loaded = fastchgnet.load_model(str(path), dtype=torch.float64)
    assert next(loaded.parameters()).dtype == torch.float64
    assert_same_state(model64, loaded)
    a, b = model64.predict(STRUCTS[0]), loaded.predict(STRUCTS[0])
    for k in "efsm":
        assert max_abs(a[k], b[k]) <= 1e-12
    # without a dtype, load_model restores the dtype the checkpoint was saved in
    assert next(fastchgnet.load_model(path).parameters()).dtype == torch.float64
    # an explicit dtype wins
    assert next(fastchgnet.load_model(path, dtype=torch.float32).parameters()).dtype == torch.float32


def test_small_random_model_round_trip(small_model, tmp_path):
    path = fastchgnet.save_checkpoint(small_model, tmp_path / "small.pt")
    loaded = fastchgnet.load_model(path)
    assert loaded.config == small_model.config
    assert loaded.config.atom_fea_dim == 16 and loaded.config.mlp_hidden_dims == (16,)
    assert_same_state(small_model, loaded)
    a, b = small_model.predict(STRUCTS), loaded.predict(STRUCTS)
    for x, y in zip(a, b):
        assert max_abs(x["e"], y["e"]) <= 1e-6
        assert max_abs(x["f"], y["f"]) <= 1e-5


def test_load_reference_weight_file_path(model):
    pytest.importorskip("chgnet")
    path = chgnet_weight_file("0.3.0")
    assert path.is_file() and path.name.endswith(".pth.tar")
    net = fastchgnet.load_model(path)
    assert_same_state(model, net)
    net_str = fastchgnet.load_model(str(path))
    assert_same_state(model, net_str)
    e1, e2 = model.predict(STRUCTS[0], task="e")["e"], net.predict(STRUCTS[0], task="e")["e"]
    np.testing.assert_array_equal(e1, e2)


def test_weights_match_reference_state_dict(model, ref_model):
    """A few converted tensors equal the reference's parameters exactly."""
    sd = ref_model.state_dict()
    ours = model.state_dict()
    assert torch.equal(ours["atom_embedding.weight"], sd["atom_embedding.embedding.weight"])
    assert torch.equal(ours["atom_ref"], sd["composition_model.fc.weight"].reshape(-1))
    assert torch.equal(ours["rbf_ag.frequencies"],
                       sd["bond_basis_expansion.rbf_expansion_ag.frequencies"])


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        fastchgnet.load_model(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError):
        fastchgnet.load_model(tmp_path)  # a directory
    with pytest.raises(FileNotFoundError):
        fastchgnet.load_model("9.9.9")  # neither a pretrained name nor a file


def test_wrong_checkpoint_content_raises_value_error(tmp_path):
    for i, obj in enumerate([{"a": 1}, [1, 2, 3], {"format": "something-else"}]):
        path = tmp_path / f"other{i}.pt"
        torch.save(obj, path)
        with pytest.raises(ValueError, match=f"other{i}.pt"):
            fastchgnet.load_model(path)


def test_unsupported_format_version_raises_value_error(small_model, tmp_path):
    path = fastchgnet.save_checkpoint(small_model, tmp_path / "future.pt")
    ckpt = torch.load(path, weights_only=False)
    ckpt["format_version"] = 999
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="format_version"):
        fastchgnet.load_model(path)


@pytest.mark.parametrize("content", [np.random.default_rng(0).bytes(2048), b"hello, this is not a checkpoint\n", b""],
                         ids=["random-bytes", "text", "empty"])
def test_garbage_file_raises_value_error(tmp_path, content):
    """A file that is not a checkpoint at all gives a clear ValueError naming the file."""
    path = tmp_path / "garbage.pth.tar"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="garbage.pth.tar"):
        fastchgnet.load_model(path)


def test_load_float64(model):
    net = fastchgnet.load_model("0.3.0", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in net.parameters())
    a = model.predict(STRUCTS, task="efsm")
    b = net.predict(STRUCTS, task="efsm")
    for x, y in zip(a, b):
        assert y["e"].dtype == np.float64 and y["f"].dtype == np.float64
        assert max_abs(x["e"], y["e"]) <= 2e-5
        assert max_abs(x["f"], y["f"]) <= 2e-4
        assert max_abs(x["s"], y["s"]) <= 2e-3
        assert max_abs(x["m"], y["m"]) <= 2e-4


def test_load_with_device_argument():
    net = fastchgnet.load_model("0.3.0", device="cpu")
    assert next(net.parameters()).device.type == "cpu"


def test_small_random_model_predicts(small_model):
    assert small_model.n_params < 50_000
    out = small_model.predict(STRUCTS, task="efsm", return_site_energies=True,
                              return_crystal_feas=True, return_atom_feas=True)
    for s, o in zip(STRUCTS, out):
        n = len(s)
        assert o["e"].shape == () and o["f"].shape == (n, 3)
        assert o["s"].shape == (3, 3) and o["m"].shape == (n,)
        assert o["site_energies"].shape == (n,)
        assert o["crystal_fea"].shape == (16,) and o["atom_fea"].shape == (n, 16)
        for v in o.values():
            assert np.isfinite(v).all()
        assert abs(float(o["site_energies"].mean()) - float(o["e"])) < 1e-4


def test_small_random_model_variants():
    """Other configurations build and run: no hidden layers, no bond/angle update, 1 conv."""
    for kw in ({"atom_conv_hidden_dim": 0, "bond_conv_hidden_dim": 0, "mlp_hidden_dims": ()},
               {"update_bond": False, "update_angle": False},
               {"n_conv": 1}, {"n_conv": 3, "gMLP_norm": None, "readout_norm": None}):
        torch.manual_seed(0)
        net = fastchgnet.CHGNet(small_config(**kw)).eval()
        out = net.predict(STRUCTS[0], task="efsm")
        assert np.isfinite(out["e"]) and np.isfinite(out["f"]).all(), kw
        assert out["f"].shape == (len(STRUCTS[0]), 3), kw


def test_config_round_trip():
    cfg = small_config(mlp_hidden_dims=(16, 8))
    again = fastchgnet.CHGNetConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError):
        fastchgnet.CHGNetConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_a_chgnet_model_object_converts_to_the_same_predictions():
    """A reference ``chgnet.model.CHGNet`` object (what chgnet users hold) converts to an exact
    model with the same weights."""
    chgnet = pytest.importorskip("chgnet.model")
    from fastchgnet.model.weights import from_chgnet_model, is_chgnet_model

    ref = chgnet.CHGNet.load(verbose=False)
    ours = from_chgnet_model(ref)
    assert is_chgnet_model(ref) and not is_chgnet_model(ours)
    base = fastchgnet.load_model("0.3.0")
    assert ours.version == base.version
    for (k, a), (k2, b) in zip(ours.state_dict().items(), base.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    with pytest.raises(TypeError, match="expected a chgnet.model.CHGNet"):
        from_chgnet_model(base)
