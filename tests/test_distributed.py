"""Data-parallel training over torch.distributed (gloo, 2 CPU processes).

* a 2-rank run ends with the parameters of a single process on the same global batches;
* a run stopped on 2 ranks resumes on 1 (a different number of ranks) and still matches;
* ``torchrun --nproc_per_node 2 -m fastchgnet train`` works end to end;
* a rank that dies, or hangs past ``--dist-timeout``, stops the job with a clear message and an
  intact ``last.pt``.

Each launch starts real processes (``MASTER_ADDR``/``WORLD_SIZE``/``RANK`` as torchrun sets them)
with one thread each and a tiny model.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastchgnet.train.distributed import global_loss, launch_env
from fastchgnet.train.loss import EFSMLoss, Targets
from fastchgnet.train import TrainConfig, train
from test_trainer import TINY, _write_extxyz, stop_at

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or
                                 not torch.distributed.is_gloo_available(), reason="needs gloo")

# one rank of a launch: spec["stop"] stops every rank after that step (as a kill would);
# spec["fault"] = [rank, step, hang] makes that rank die (exit code 3) or hang after that step
WORKER = """
import json, os, sys, time
from fastchgnet.train import TrainConfig, train
spec = json.loads(sys.argv[1])
callbacks = []
if spec.get("stop") is not None:
    def stop(trainer, n=spec["stop"]):
        if trainer.step >= n:
            trainer.request_stop()
    callbacks.append(stop)
if spec.get("fault"):
    def fault(trainer, rank=spec["fault"][0], step=spec["fault"][1], hang=spec["fault"][2]):
        if trainer.dist is not None and trainer.dist.rank == rank and trainer.step >= step:
            if hang:
                time.sleep(3600)
            os._exit(3)
    callbacks.append(fault)
train(TrainConfig(**spec["config"]), callbacks=callbacks)
"""
LAUNCH_TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cmd: list[str], world: int, logs: Path, env: dict[str, str] | None = None,
            timeout: float = LAUNCH_TIMEOUT, wait_for: int | None = None) -> list[tuple[int | None, str]]:
    """Start ``world`` processes of ``cmd`` as torchrun would; returns (exit code, stderr) per rank.
    ``wait_for``: wait only for that rank, then kill the others (a hung rank)."""
    logs.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs, files = [], []
    for r in range(world):
        e = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "WORLD_SIZE": str(world), "RANK": str(r), "LOCAL_RANK": str(r), **(env or {})}
        err = open(logs / f"rank{r}.err", "w")
        files.append(err)
        procs.append(subprocess.Popen(cmd, env=e, stdout=subprocess.DEVNULL, stderr=err))
    deadline = time.time() + timeout
    try:
        for r, p in enumerate(procs):
            if wait_for is not None and r != wait_for:
                continue
            p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"distributed run still running after {timeout} s (hang)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()
    return [(p.returncode, (logs / f"rank{r}.err").read_text()) for r, p in enumerate(procs)]


def _params(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _metrics(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data, a base config (fp64: the comparisons are to round-off) and a single-process reference
    run of 2 epochs x 4 steps of 8 structures."""
    root = tmp_path_factory.mktemp("dist")
    xyz = _write_extxyz(root / "toy.xyz", n=40)
    base = dict(data=str(xyz), model_config=TINY, epochs=2, batch_size=8, lr=1e-3,
                cache=str(root / "cache"), device="cpu", progress=False, plots=False,
                cache_workers=1, split=(0.8, 0.1, 0.1), precision="fp64")
    ref = TrainConfig(**base, out=str(root / "single"))
    train(ref, log=lambda m: None)
    worker = root / "worker.py"
    worker.write_text(WORKER)
    return {"root": root, "xyz": xyz, "base": base, "ref": Path(ref.out), "worker": worker}


def _run_ranks(setup, name: str, world: int = 2, stop: int | None = None, **kw) -> tuple[Path, list]:
    out = setup["root"] / name
    spec = {"config": {**setup["base"], "out": str(out), **kw}, "stop": stop}
    res = _launch([sys.executable, str(setup["worker"]), json.dumps(spec)], world, out / "logs")
    return out, res


def test_two_ranks_equal_one_process_on_the_same_global_batch(setup):
    out, res = _run_ranks(setup, "ddp")
    assert [c for c, _ in res] == [0, 0], res
    a, b = _params(setup["ref"] / "last.pt"), _params(out / "last.pt")
    for k in a:  # 8 Adam steps; fp64: equal to round-off
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-10, msg=k)
    ra, rb = _metrics(setup["ref"]), _metrics(out)
    for x, y in zip(ra, rb):
        for col in ("train_loss", "val_e_mae", "val_f_mae", "val_s_mae", "lr"):
            assert float(y[col]) == pytest.approx(float(x[col]), rel=1e-9), col
        # the validation loss is a structure-weighted mean of per-batch losses, and sharded
        # validation batches differently: close, not equal
        assert float(y["val_loss"]) == pytest.approx(float(x["val_loss"]), rel=1e-3)
        assert float(x["load_cv"]) == 0.0 and 0.0 < float(y["load_cv"]) < 0.2
    log = (out / "train.log").read_text()
    assert log.count("AtomRef fitted") == 1 and "distributed: 2 ranks, backend gloo" in log
    test_a = json.loads((setup["ref"] / "test.json").read_text())
    test_b = json.loads((out / "test.json").read_text())
    assert test_b["e_mae"] == pytest.approx(test_a["e_mae"], rel=1e-9)


def test_two_ranks_train_the_heads_model_like_one_process(setup):
    """The heads model (forces and stress from output heads, first-order backward) under DDP,
    with a moving average of the weights (the same on every rank) and a second stage with other
    prefactors and learning rate."""
    kw = dict(epochs=2, model="heads", ema_decay=0.9, stage_two_start=1, stage_two_prefactors={"e": 8.0},
              stage_two_lr=2e-4)
    ref = TrainConfig(**{**setup["base"], **kw}, out=str(setup["root"] / "heads1"))
    train(ref, log=lambda m: None)
    out, res = _run_ranks(setup, "heads2", **kw)
    assert [c for c, _ in res] == [0, 0], res
    for name in ("last.pt", "best.pt"):  # raw weights, averaged weights
        a, b = _params(Path(ref.out) / name), _params(out / name)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-10, msg=f"{name}: {k}")


@pytest.mark.slow
def test_two_ranks_train_the_compiled_heads_model_like_one_eager_process(setup):
    """torch.compile of the DDP-wrapped heads model (backend aot_eager: the graph capture and
    AOTAutograd of inductor, without code generation, which would take minutes on a CPU)."""
    ref = TrainConfig(**{**setup["base"], "epochs": 1, "model": "heads"}, out=str(setup["root"] / "heads1c"))
    train(ref, log=lambda m: None)
    out, res = _run_ranks(setup, "heads2c", epochs=1, model="heads", compile="aot_eager")
    assert [c for c, _ in res] == [0, 0], res
    a, b = _params(Path(ref.out) / "last.pt"), _params(out / "last.pt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-10, msg=k)


def test_compile_of_a_distributed_run_needs_a_heads_model(setup):
    """One process compiles every model (tests/test_compile.py); under DDP only the heads model
    (its graph is split at the gradient buckets, the traced energy gradient is not supported)."""
    out, res = _run_ranks(setup, "exact-compile", epochs=1, compile="eager")
    assert all(c != 0 for c, _ in res), res
    assert any("--model heads" in text for _, text in res), res


def test_stopped_on_two_ranks_resumes_on_one(setup):
    """Killed mid-epoch 2 on 2 ranks (checkpoint every step), resumed by a single process: the
    same parameters as the uninterrupted single-process run."""
    out, res = _run_ranks(setup, "cut", stop=6, checkpoint_every=1)
    assert [c for c, _ in res] == [0, 0], res
    state = torch.load(out / "last.pt", weights_only=True)["trainer"]
    assert state["step"] == 6 and state["world_size"] == 2
    train(TrainConfig(out=str(out), epochs=2, resume=True, device="cpu", progress=False),
          log=lambda m: None)
    a, b = _params(setup["ref"] / "last.pt"), _params(out / "last.pt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-10, msg=k)
    ra, rb = _metrics(setup["ref"]), _metrics(out)
    assert [r["epoch"] for r in rb] == ["1", "2"]
    # the running loss of the interrupted epoch was summed over both ranks before the checkpoint
    assert float(rb[1]["train_loss"]) == pytest.approx(float(ra[1]["train_loss"]), rel=1e-9)


def test_stopped_on_one_process_resumes_on_two_ranks(setup):
    out = setup["root"] / "grow"
    cfg = TrainConfig(**setup["base"], out=str(out), checkpoint_every=1)
    assert train(cfg, log=lambda m: None, callbacks=[stop_at(5)]) == {}
    spec = {"config": {"out": str(out), "epochs": 2, "resume": True, "device": "cpu", "progress": False}}
    res = _launch([sys.executable, str(setup["worker"]), json.dumps(spec)], 2, out / "logs")
    assert [c for c, _ in res] == [0, 0], res
    a, b = _params(setup["ref"] / "last.pt"), _params(out / "last.pt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-10, msg=k)
    assert torch.load(out / "last.pt", weights_only=True)["trainer"]["world_size"] == 2


def test_torchrun_cli(setup, tmp_path):
    """The documented launch: torchrun --nproc_per_node 2 -m fastchgnet train ..."""
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastchgnet", "train", "--data", str(setup["xyz"]), "--init", str(setup["ref"] / "best.pt"),
           "--epochs", "1", "--batch-size", "8", "--split", "0.8,0.1,0.1", "--cache", str(setup["root"] / "cache"),
           "--device", "cpu", "--no-progress", "--no-plots", "--out", str(out), "--balance", "paper",
           "--bucket-mb", "0.01", "--log-every", "2"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "test.json").read_text())["n_test"] == 4
    rows = _metrics(out)
    assert len(rows) == 1 and float(rows[0]["load_cv"]) > 0
    log = (out / "train.log").read_text()
    assert "balance paper" in log and log.count("load_cv") >= 2  # steps 2 and 4, once each
    assert not (out / "run.lock").exists()  # rank 0 locked the folder and released it


def _fault_cmd(setup, out: Path, fault: list, **kw) -> list[str]:
    """A long run (checkpoint every 2 steps) in which rank ``fault[0]`` dies or hangs after step
    ``fault[1]`` (a step callback installed by the worker script)."""
    config = dict(data=str(setup["xyz"]), init=str(setup["ref"] / "best.pt"), epochs=50, batch_size=8,
                  split=(0.8, 0.1, 0.1), cache=str(setup["root"] / "cache"), device="cpu",
                  progress=False, plots=False, checkpoint_every=2, out=str(out), **kw)
    return [sys.executable, str(setup["worker"]), json.dumps({"config": config, "fault": fault})]


def test_a_rank_that_dies_stops_the_job_with_the_checkpoint_intact(setup, tmp_path):
    out = tmp_path / "dies"
    t0 = time.time()
    res = _launch(_fault_cmd(setup, out, [1, 3, False]), 2, tmp_path / "logs", timeout=120)
    elapsed = time.time() - t0
    (code0, err0), (code1, _) = res
    assert code1 == 3 and code0 == 1, res
    assert "rank 0 of 2: training stopped" in err0 and "is intact: continue with --resume" in err0, err0
    assert elapsed < 120
    state = torch.load(out / "last.pt", weights_only=True)["trainer"]  # loadable
    assert state["step"] == 2
    import fastchgnet

    fastchgnet.load_model(out / "last.pt")


def test_a_hung_rank_stops_the_job_after_the_timeout(setup, tmp_path):
    out = tmp_path / "hangs"
    t0 = time.time()
    res = _launch(_fault_cmd(setup, out, [1, 3, True], dist_timeout=5), 2, tmp_path / "logs",
                  timeout=120, wait_for=0)
    code0, err0 = res[0]
    assert code0 == 1, err0
    assert "rank 0 of 2: training stopped" in err0 and "--dist-timeout 5 s" in err0, err0
    assert time.time() - t0 < 120
    assert torch.load(out / "last.pt", weights_only=True)["trainer"]["step"] == 2


# ------------------------------------------------------------------------------------------------
# units


def test_launch_environment_detection():
    assert launch_env({}) is None
    assert launch_env({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is None  # one process
    assert launch_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == (4, 3, 1)
    slurm = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
    assert launch_env(slurm) is None  # srun alone is not a distributed launch ...
    assert launch_env({**slurm, "MASTER_ADDR": "node1"}) == (8, 5, 1)  # ... with MASTER_ADDR it is
    with pytest.raises(ValueError, match="outside"):
        launch_env({"WORLD_SIZE": "2", "RANK": "2"})


class _Env:
    """Stands in for a DistEnv: the all-reduce adds ``other`` (the other ranks' counts)."""

    def __init__(self, world: int, other: torch.Tensor | None = None) -> None:
        self.world_size, self.other, self.seen = world, other, None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self.seen = t.clone()
        if self.other is not None:
            t += self.other
        return t


def test_global_loss_shares_add_up_to_the_loss_of_the_whole_batch():
    """Split a batch (masked and absent labels, unequal atoms) over two ranks: the shares, each
    normalised by the global label counts, add up to EFSMLoss of the whole batch, and one rank
    alone gets exactly EFSMLoss."""
    g = torch.Generator().manual_seed(0)
    pred = {"e": torch.randn(3, generator=g), "f": torch.randn(7, 3, generator=g),
            "s": torch.randn(3, 3, 3, generator=g), "m": torch.randn(7, generator=g)}
    lab = {"e": torch.randn(3, generator=g), "f": torch.randn(7, 3, generator=g),
           "m": torch.randn(7, generator=g)}
    f_mask, m_mask = torch.tensor([True, False, True]), torch.tensor([1, 0, 1, 1, 0, 0, 1]).bool()
    atom_graph = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    fn = EFSMLoss(loss="huber", delta=0.1)

    def part(graphs: slice, atoms: slice, offset: int) -> tuple[dict, Targets]:
        p = {"e": pred["e"][graphs], "f": pred["f"][atoms], "s": pred["s"][graphs], "m": pred["m"][atoms]}
        t = Targets(e=lab["e"][graphs], f=lab["f"][atoms], f_mask=f_mask[graphs], s=None,
                    m=lab["m"][atoms], m_mask=m_mask[atoms], atom_graph=atom_graph[atoms] - offset)
        return p, t

    whole, _ = fn(*part(slice(0, 3), slice(0, 7), 0))
    loss, share = global_loss(fn, *part(slice(0, 3), slice(0, 7), 0), _Env(1))
    torch.testing.assert_close(loss, whole)
    torch.testing.assert_close(share, whole)
    a, b = part(slice(0, 2), slice(0, 5), 0), part(slice(2, 3), slice(5, 7), 2)
    ea, eb = _Env(2), _Env(2)
    global_loss(fn, *a, ea)
    global_loss(fn, *b, eb)
    loss_a, share_a = global_loss(fn, *a, _Env(2, eb.seen))
    _, share_b = global_loss(fn, *b, _Env(2, ea.seen))
    torch.testing.assert_close(share_a + share_b, whole)
    torch.testing.assert_close(loss_a, 2 * share_a)  # DDP averages over the 2 ranks


# ------------------------------------------------------------------------------------------------
# the scaling tool (python -m fastchgnet.bench.scaling)


def test_allreduce_model():
    from fastchgnet.bench.scaling import Network, allreduce_ms, expected_max_normal

    net = Network(gpus_per_node=8, nvlink_gbps=100.0, nvlink_latency_us=5.0, ib_gbps=10.0, ib_latency_us=10.0)
    assert allreduce_ms(1e6, 1, net) == 0.0
    # one node, 4 GPUs: 2 * 3/4 * 1 MB / 100 GB/s + 6 * 5 us = 15 us + 30 us
    assert allreduce_ms(1e6, 4, net) == pytest.approx(0.045)
    # 16 GPUs on 2 nodes: the node part with g = 8, plus 2 * 1/2 * (1 MB / 8) / 10 GB/s + 2 * 10 us
    intra = 2 * 7 / 8 * 1e6 / 100e9 + 14 * 5e-6
    assert allreduce_ms(1e6, 16, net) == pytest.approx(1e3 * (intra + 12.5e-6 + 20e-6))
    assert allreduce_ms(1e6, 32, net) > allreduce_ms(1e6, 16, net) > allreduce_ms(1e6, 8, net)
    assert expected_max_normal(1) == 0.0
    assert expected_max_normal(4) == pytest.approx(1.029, abs=0.03)  # Blom: 1.049
    assert expected_max_normal(32) == pytest.approx(2.07, abs=0.05)


def test_scaling_prediction_limits():
    from fastchgnet.bench.scaling import Network, predict

    free = Network(nvlink_gbps=1e12, nvlink_latency_us=0.0, ib_gbps=1e12, ib_latency_us=0.0)
    # no fixed cost, free communication: strong-scaling efficiency is set by imbalance alone
    pred = predict(0.0, 1.0, 412_525, net=free, global_batch=512, weak_batch=32)
    for kind in ("strong", "weak"):
        rows = pred[kind]
        assert [r["ranks"] for r in rows] == [4, 8, 16, 32] and rows[0]["efficiency"] == 1.0
        for r in rows:
            assert r["efficiency"] == pytest.approx(rows[0]["imbalance"] / r["imbalance"])
    # a fixed cost per step makes strong scaling sub-linear; communication costs both
    strong = predict(10.0, 1.0, 412_525)["strong"]
    assert all(a["efficiency"] > b["efficiency"] for a, b in zip(strong, strong[1:]))
    assert strong[1]["paper_efficiency"] == 0.825
    assert all(r["allreduce_ms"] > 0 for r in strong)


def test_scaling_tool_runs_on_the_cpu(tmp_path):
    import io

    from fastchgnet.bench.scaling import main

    buf = io.StringIO()
    res = main(["--device", "cpu", "--tiny", "--batch-sizes", "1,2", "--repeats", "1", "--warmup", "0",
                "--max-atoms", "8", "--json", str(tmp_path / "s.json")], stream=buf)
    assert [r["per_rank_batch"] for r in res["measured"]] == [1, 2]
    assert all(r["step_ms"] > 0 for r in res["measured"])
    assert [r["ranks"] for r in res["prediction"]["strong"]] == [4, 8, 16, 32]
    text = buf.getvalue()
    assert "strong scaling" in text and "weak scaling" in text and "predicts nothing about GPUs" in text
    assert json.loads((tmp_path / "s.json").read_text())["rows"][0]["fit"]["k_ms_per_structure"] >= 0


@pytest.mark.slow
def test_bucket_size_script_times_real_torchrun_jobs(setup, tmp_path):
    """scripts/ddp_buckets.py: one torchrun job (2 gloo ranks) per bucket size, throughput from
    the epochs after the first, a JSON record."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "ddp_buckets.py"
    rec = tmp_path / "b.json"
    res = subprocess.run([sys.executable, str(script), "--data", str(setup["xyz"]), "--limit", "16",
                          "--buckets", "default,25", "--repeats", "1", "--epochs", "2", "--json", str(rec)],
                         capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(rec.read_text())["rows"]
    assert [r["bucket_mb"] for r in rows] == ["default", "25"]
    assert all(len(r["structures_per_s"]) == 1 and r["median"] > 0 for r in rows)
    assert "| 25 |" in res.stdout
