"""Fast inference (fastchgnet.compile): compiled forward == eager with no graph break,
padding to size buckets leaves the outputs unchanged, the exported program (torch.export and
AOTInductor) == eager and runs in a process that never imports fastchgnet."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fastchgnet
from fastchgnet.data import build_graph, collate
from fastchgnet.data.prototypes import make
from fastchgnet.compile import (CompileCounter, CompiledForward, CUDAGraphForward, batch_args, bucket,
                                export_model, load_exported, pad_batch, save_exported)
from fastchgnet.model.heads import HeadsCHGNet

from conftest import small_config

MODELS = {"exact": fastchgnet.CHGNet, "decoupled": fastchgnet.DecoupledCHGNet, "heads": HeadsCHGNet,
          # the pair-energy force head adds to the energy: padding must not add to it
          "heads-pair": lambda cfg: HeadsCHGNet(cfg, force_head="pair+direct")}


def _model(kind: str, dtype=torch.float32):
    torch.manual_seed(0)
    net = MODELS[kind](small_config()).to(dtype)
    with torch.no_grad():
        net.atom_ref.copy_(torch.linspace(-5.0, -1.0, net.atom_ref.numel()))
    return net.eval()


def _batches(dtype=torch.float32):
    a = [make("rocksalt", ["Na", "Cl"], rattle=0.05, seed=1), make("bcc", ["Fe"], supercell=2,
                                                                   rattle=0.05, seed=2)]
    b = [make("perovskite", ["Sr", "Ti", "O"], rattle=0.05, seed=3), *a[::-1]]
    return (collate([build_graph(s) for s in a], dtype), collate([build_graph(s) for s in b], dtype))


def _close(out, ref, task="efsm", atol=1e-5):
    for k in task:
        torch.testing.assert_close(out[k], ref[k].detach(), rtol=1e-5, atol=atol, msg=k)


def test_bucket_series():
    sizes = [bucket(n) for n in range(1, 5000, 7)]
    assert all(s >= n and s % 8 == 0 for s, n in zip(sizes, range(1, 5000, 7)))
    assert all(s <= max(64, 1.25 * n + 8) for s, n in zip(sizes, range(1, 5000, 7)))
    assert len(set(sizes)) < 25  # few distinct shapes
    assert bucket(1000) == bucket(bucket(1000))


@pytest.mark.parametrize("kind", list(MODELS))
def test_padding_leaves_outputs_unchanged(kind):
    model = _model(kind, torch.float64)
    _, batch = _batches(torch.float64)
    ref = model(batch, task="efsm")
    padded = pad_batch(batch, batch.num_bonds + 37, batch.num_angles + 11)
    assert padded.num_bonds == batch.num_bonds + 37 and padded.num_graphs == batch.num_graphs + 1
    out = CUDAGraphForward(model, capture=False)(batch, "efsm")
    _close(out, ref, atol=1e-12)
    full = model(padded, task="efsm")
    assert all(torch.isfinite(full[k]).all() for k in "efsm")  # the padding structure is sane
    with pytest.raises(ValueError, match="cannot pad"):
        pad_batch(batch, batch.num_bonds + 1, batch.num_angles)


def test_compiled_forward_one_graph_and_equal_to_eager():
    from torch._dynamo.utils import counters

    from fastchgnet.sim import BatchedMD, BatchPotential

    model = _model("exact", torch.float64)
    b1, b2 = _batches(torch.float64)
    cc = CompileCounter("aot_eager")
    torch._dynamo.reset()
    counters.clear()
    fwd = CompiledForward(model, backend=cc)
    _close(fwd(b1, "efsm"), model(b1, task="efsm"), atol=1e-10)
    frames = cc.frame_count
    _close(fwd(b2, "efsm"), model(b2, task="efsm"), atol=1e-10)  # other sizes: no recompile
    assert cc.frame_count == frames
    assert counters["stats"]["unique_graphs"] == 1
    if hasattr(torch._dynamo.config, "trace_autograd_ops"):
        assert not counters["graph_break"], dict(counters["graph_break"])
    # MD with the compiled forward follows the eager trajectory
    structs = [make("rocksalt", ["Na", "Cl"], rattle=0.05, seed=1)]
    eager = BatchedMD(model, structs, timestep=1.0, init_temperature=300.0, seed=0)
    comp = BatchedMD(BatchPotential(model, forward=fwd), structs, timestep=1.0,
                     velocities=eager.velocities)
    eager.run(5)
    comp.run(5)
    torch.testing.assert_close(comp.gi.positions, eager.gi.positions, rtol=0, atol=1e-10)
    assert counters["stats"]["unique_graphs"] == 2  # the "ef" task of MD once more, and no more


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(MODELS))
def test_compiled_inductor_equals_eager(kind):
    model = _model(kind)
    b1, b2 = _batches()
    fwd = CompiledForward(model)
    _close(fwd(b1, "efsm"), model(b1, task="efsm"))
    _close(fwd(b2, "efsm"), model(b2, task="efsm"))


@pytest.mark.parametrize("kind", list(MODELS))
def test_exported_program_equals_eager(kind):
    model = _model(kind)
    b1, b2 = _batches()
    ep = export_model(model, b1, "efsm")
    one_atom = collate([build_graph(make("simple_cubic", ["Mo"]))])
    no_angles = collate([build_graph(make("rocksalt", ["Cs", "I"], rattle=0.02, seed=1))])
    assert one_atom.num_atoms == 1 and no_angles.num_angles == 0
    for b in (b1, b2, one_atom, no_angles):  # the example and batches of other sizes
        out = dict(zip("efsm", ep.module()(*batch_args(b))))
        _close(out, model(b, task="efsm"))


RUNNER = textwrap.dedent("""
    import json, sys, torch
    path, inputs, kind, out_path = sys.argv[1:5]
    args = torch.load(inputs)
    if kind == "aoti":
        fn = torch._inductor.aoti_load_package(path)
    else:
        fn = torch.export.load(path).module()
    outs = fn(*args)
    assert not any(m.startswith("fastchgnet") for m in sys.modules), "fastchgnet was imported"
    torch.save(list(outs), out_path)
""")


def _run_without_fastchgnet(tmp_path, path, batch, kind):
    torch.save(list(batch_args(batch)), tmp_path / "inputs.pt")
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    # run from tmp_path so that the repository is not on sys.path
    subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "inputs.pt"), kind,
                    str(tmp_path / "outs.pt")], check=True, cwd=tmp_path, timeout=600)
    return dict(zip("efsm", torch.load(tmp_path / "outs.pt")))


def test_saved_program_runs_without_fastchgnet(tmp_path):
    model = _model("exact")
    b1, b2 = _batches()
    path = save_exported(model, tmp_path / "model.pt2", b1, "efsm", aoti=False)
    loaded = load_exported(path)
    assert loaded.task == "efsm" and loaded.graph_kwargs["atom_cutoff"] == 6.0
    ref = model(b2, task="efsm")
    _close(loaded(b2), ref)
    _close(_run_without_fastchgnet(tmp_path, path, b2, "program"), ref)
    with pytest.raises(ValueError, match="computes 'efsm'"):
        loaded(b2, task="efsmx")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["exact", "heads"])
def test_aoti_package_equals_eager_without_fastchgnet(tmp_path, kind):
    model = _model(kind)
    b1, b2 = _batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = save_exported(model, tmp_path / "model.pt2", b1, "efsm")
    ref = model(b2, task="efsm")
    loaded = load_exported(path)
    assert json.loads(loaded.meta["fastchgnet_graph"])["bond_cutoff"] == 3.0
    _close(loaded(b2), ref)
    for s in (make("simple_cubic", ["Mo"]), make("rocksalt", ["Cs", "I"], rattle=0.02, seed=1)):
        b = collate([build_graph(s)])  # one atom; no angles
        _close(loaded(b), model(b, task="efsm"))
    _close(_run_without_fastchgnet(tmp_path, path, b2, "aoti"), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["exact", "heads"])
def test_cuda_graph_replay_equals_eager(kind):
    model = _model(kind).cuda()
    b1, b2 = (b.to("cuda") for b in _batches())
    fwd = CUDAGraphForward(model)
    _close(fwd(b1, "efs"), model(b1, task="efs"), task="efs")
    moved = b1.to("cuda")
    moved.positions = moved.positions + 0.01  # same bucket: replayed, not captured again
    _close(fwd(moved, "efs"), model(moved, task="efs"), task="efs")
    _close(fwd(b2, "efs"), model(b2, task="efs"), task="efs")
    assert len(fwd.graphs) == 2
