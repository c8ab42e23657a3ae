"""The model's forward pass never synchronises with the host (no device -> host transfers)."""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import pytest
import torch

import fastchgnet
import fastchgnet.kernels
from fastchgnet.data.prototypes import make

PKG = Path(fastchgnet.__file__).resolve().parent
KERNELS = Path(fastchgnet.kernels.__file__).resolve().parent
FORWARD_SOURCES = [*(PKG / "model" / f for f in ("exact.py", "backbone.py", "blocks.py", "outputs.py",
                                                  "heads.py", "decoupled.py")),
                   *sorted((PKG / "nn").glob("*.py")),
                   *sorted(KERNELS.glob("*.py"))]
SYNC_METHODS = {"item", "tolist", "cpu", "numpy"}


def sync_calls(path: Path) -> list[str]:
    """``x.item()``, ``x.tolist()``, ``x.cpu()``, ``x.numpy()`` calls in a source file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in SYNC_METHODS):
            found.append(f"{path.name}:{node.lineno}: .{node.func.attr}()")
    return found


def test_forward_sources_exist():
    assert all(p.is_file() for p in FORWARD_SOURCES)
    assert len(FORWARD_SOURCES) >= 3


def test_sync_call_detector_works():
    """The static check can fail: it finds such calls in the prediction API, which converts
    results to numpy on purpose."""
    assert sync_calls(PKG / "model" / "predict.py")


@pytest.mark.parametrize("path", FORWARD_SOURCES, ids=lambda p: p.name)
def test_no_sync_calls_in_forward_sources(path):
    assert not sync_calls(path)


def _batch():
    structs = [make("rocksalt", ["Na", "Cl"], rattle=0.05, seed=1), make("bcc", ["Fe"]),
               make("perovskite", ["Sr", "Ti", "O"], rattle=0.05, seed=2)]
    return fastchgnet.collate(fastchgnet.build_graphs(structs))


@contextlib.contextmanager
def forbid_host_sync():
    """Make every Tensor method that copies a value to the host raise."""
    names = ["item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
             "nonzero"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def trap(name):
        def f(self, *args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called in the forward pass")
        return f

    try:
        for n in names:
            setattr(torch.Tensor, n, trap(n))
        yield
    finally:
        for n, v in saved.items():
            setattr(torch.Tensor, n, v)


def test_forward_makes_no_host_transfers_cpu(model):
    """Run the forward pass with the host-transfer methods trapped (works on CPU too)."""
    batch = _batch()
    with forbid_host_sync():
        with pytest.raises(AssertionError, match="host sync"):
            torch.ones(1).item()  # the trap is armed
        out = model(batch, task="efsm", return_site_energies=True, return_crystal_feas=True,
                    return_atom_feas=True)
        out_train = model(batch, task="efsm", create_graph=True)
    assert out["f"].shape == (batch.num_atoms, 3)
    assert out_train["s"].shape == (batch.num_graphs, 3, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_forward_no_host_sync_cuda():
    net = fastchgnet.load_model("0.3.0", device="cuda")
    batch = _batch().to("cuda")
    net(batch, task="efsm")  # warm-up (lazy initialisation may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = net(batch, task="efsm")
        out2 = net(batch, task="e")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert out["f"].shape == (batch.num_atoms, 3) and out2["e"].shape == (batch.num_graphs,)
