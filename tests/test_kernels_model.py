"""The whole exact model with the Triton kernels forced equals the plain-torch path.

On CPU-only machines the kernels run under TRITON_INTERPRET=1 (set by conftest.py); with a GPU the
same tests also run on CUDA with compiled kernels.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastchgnet
import fastchgnet.kernels as kernels
from fastchgnet.data.prototypes import make

pytest.importorskip("triton")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _structures():
    return [
        make("rocksalt", ["Na", "Cl"], rattle=0.05, seed=1).get_primitive_structure(),
        make("perovskite", ["Sr", "Ti", "O"], strain=0.01, rattle=0.05, seed=2),
    ]


def _small_model(dtype):
    torch.manual_seed(0)
    cfg = fastchgnet.CHGNetConfig(atom_fea_dim=16, bond_fea_dim=16, angle_fea_dim=16,
                                  num_radial=7, num_angular=7, n_conv=3, atom_conv_hidden_dim=16,
                                  bond_conv_hidden_dim=16, angle_layer_hidden_dim=0,
                                  mlp_hidden_dims=(16,))
    model = fastchgnet.CHGNet(cfg).to(dtype)
    with torch.no_grad():  # non-trivial LayerNorm affine and AtomRef
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.atom_ref.copy_(torch.randn_like(model.atom_ref))
    return model


def _run(model, batch, monkeypatch, mode):
    monkeypatch.setenv("FASTCHGNET_KERNELS", mode)
    model.zero_grad(set_to_none=True)
    out = model(batch, task="efsm", create_graph=True)
    loss = (out["e"] ** 2).sum() + (out["f"] ** 2).sum() + 0.1 * (out["s"] ** 2).sum() + out["m"].sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


def _count_kernel_calls(monkeypatch) -> dict[str, int]:
    """Wrap the three fused functions so a test can see that the kernels really ran."""
    import fastchgnet.kernels.angle as ka
    import fastchgnet.kernels.gated as kg
    import fastchgnet.kernels.radial as kr

    calls = {"radial_bases": 0, "angle_basis": 0, "gated_epilogue": 0}
    for mod in (kr, ka, kg):
        for name in calls:
            if hasattr(mod, name):
                orig = getattr(mod, name)

                def wrapped(*a, _orig=orig, _name=name, **k):
                    calls[_name] += 1
                    return _orig(*a, **k)

                monkeypatch.setattr(mod, name, wrapped)
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_model_with_kernels_equals_torch_path(device, dtype, monkeypatch):
    model = _small_model(dtype).to(device).train()
    graphs = fastchgnet.build_graphs(_structures())
    batch = fastchgnet.collate(graphs, dtype=dtype).to(device)
    calls = _count_kernel_calls(monkeypatch)
    ref_out, ref_grads = _run(model, batch, monkeypatch, "torch")
    assert sum(calls.values()) == 0
    ker_out, ker_grads = _run(model, batch, monkeypatch, "triton")
    # 1 radial call, 1 angle call, one epilogue per GatedMLP (3 atom, 2 bond, 1 angle layer)
    assert calls == {"radial_bases": 1, "angle_basis": 1, "gated_epilogue": 6}, calls
    tol = {torch.float32: 2e-4, torch.float64: 1e-9}[dtype]
    for k in ("e", "f", "s", "m"):
        scale = max(1.0, float(ref_out[k].abs().max()))
        assert float((ker_out[k] - ref_out[k]).abs().max()) <= tol * scale, k
    assert set(ker_grads) == set(ref_grads)
    assert len(ref_grads) > 20
    for name, g in ref_grads.items():
        scale = max(1.0, float(g.abs().max()))
        diff = float((ker_grads[name] - g).abs().max())
        assert diff <= 10 * tol * scale, f"{name}: {diff}"


@pytest.mark.parametrize("device", DEVICES)
def test_pretrained_model_with_kernels(device, monkeypatch):
    """CHGNet 0.3.0 weights, float32: kernels and torch path agree within the parity tolerances."""
    try:
        model = fastchgnet.load_model("0.3.0", device=device)
    except FileNotFoundError:
        pytest.skip("chgnet weights not installed")
    s = _structures()[0]
    monkeypatch.setenv("FASTCHGNET_KERNELS", "torch")
    a = model.predict(s, task="efsm")
    monkeypatch.setenv("FASTCHGNET_KERNELS", "triton")
    b = model.predict(s, task="efsm")
    assert abs(float(a["e"] - b["e"])) <= 2e-5
    assert abs(a["f"] - b["f"]).max() <= 2e-4
    assert abs(a["s"] - b["s"]).max() <= 2e-3
    assert abs(a["m"] - b["m"]).max() <= 2e-4


def test_dispatch_modes(monkeypatch):
    x = torch.zeros(3)
    monkeypatch.setenv("FASTCHGNET_KERNELS", "torch")
    assert not kernels.use_triton(x)
    monkeypatch.setenv("FASTCHGNET_KERNELS", "auto")
    assert kernels.use_triton(x) == (x.is_cuda and kernels.has_triton())
    monkeypatch.setenv("FASTCHGNET_KERNELS", "bogus")
    with pytest.raises(ValueError, match="FASTCHGNET_KERNELS"):
        kernels.use_triton(x)
    monkeypatch.setenv("FASTCHGNET_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.use_triton(x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.use_triton(x)


def test_kernel_ops_are_registered():
    import fastchgnet.kernels.angle  # noqa: F401
    import fastchgnet.kernels.gated  # noqa: F401
    import fastchgnet.kernels.radial  # noqa: F401

    for name in ("radial_bases", "angle_basis", "gated_epilogue"):
        assert hasattr(torch.ops.fastchgnet, name), name
        assert hasattr(torch.ops.fastchgnet, f"{name}_backward"), name


def test_kernels_package_layering():
    """kernels/ imports nothing from fastchgnet.nn (nn.fused dispatches, nn.functional holds the
    references), and no kernels submodule imports the package ``fastchgnet.kernels`` itself."""
    root = Path(kernels.__file__).resolve().parent
    found = []
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):  # imports inside functions count too
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if not node.level else ["<relative>"]
            else:
                continue
            for name in names:
                if name == "<relative>":
                    found.append(f"{path.name}:{node.lineno}: relative import")
                elif name == "fastchgnet.nn" or name.startswith("fastchgnet.nn."):
                    found.append(f"{path.name}:{node.lineno}: imports {name}")
                elif path.name != "__init__.py" and name == "fastchgnet.kernels":
                    found.append(f"{path.name}:{node.lineno}: imports the package")
    assert not found, found
    for old in ("radial_bases", "angle_basis", "gated_epilogue"):  # dispatchers: nn.fused
        assert old not in kernels.__all__


def test_dispatch_imports_no_triton():
    """Importing the dispatch point and the policy imports neither Triton nor a kernel module."""
    code = ("import sys, fastchgnet.kernels, fastchgnet.nn.fused, fastchgnet.nn.layers, "
            "fastchgnet.nn.basis; print(sorted(m for m in sys.modules if m == 'triton' or "
            "m.startswith(('triton.', 'fastchgnet.kernels.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.split() == ["['fastchgnet.kernels._env']"], out.stdout


@pytest.mark.parametrize("device", DEVICES)
def test_decoupled_model_with_kernels_equals_torch_path(device, monkeypatch):
    """The decoupled block feeds the kernels column slices of one packed first layer."""
    dtype = torch.float64
    exact = _small_model(dtype)
    model = fastchgnet.DecoupledCHGNet(exact.config).to(device, dtype).train()
    model.load_state_dict(exact.state_dict())
    batch = fastchgnet.collate(fastchgnet.build_graphs(_structures()), dtype=dtype).to(device)
    ref_out, ref_grads = _run(model, batch, monkeypatch, "torch")
    ker_out, ker_grads = _run(model, batch, monkeypatch, "triton")
    for k in ("e", "f", "s", "m"):
        torch.testing.assert_close(ker_out[k], ref_out[k], rtol=1e-9, atol=1e-9)
    assert set(ker_grads) == set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(ker_grads[name], g, rtol=1e-8, atol=1e-8, msg=name)


def test_moved_dispatchers_name_their_new_place():
    import fastchgnet.kernels as k

    for name in ("radial_bases", "angle_basis", "gated_epilogue"):
        with pytest.raises(AttributeError, match=f"fastchgnet.nn.fused.{name}"):
            getattr(k, name)
    from fastchgnet.kernels import radial  # submodules still import through the package

    assert callable(radial.radial_bases)
