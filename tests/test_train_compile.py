"""The trainer's compile policy (:mod:`fastchgnet.compile.train`): ``auto`` compiles after a time
budget of eager steps and keeps the compiled step only when it is faster; a compiled step that
fails runs again eagerly and the run goes on eagerly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastchgnet.compile.train import TRIAL_STEPS, TrainForward, resolve_train_compile
from fastchgnet.train import TrainConfig, train

from test_trainer import _cfg, _params, _write_extxyz


def _forward(policy, can_auto=True, after=10.0):
    logs: list[str] = []
    fwd = TrainForward(lambda b, **kw: ("eager", b), policy, device=torch.device("cpu"),
                       can_auto=can_auto, compile_after_s=after, auto_backend="eager",
                       log=logs.append)
    return fwd, logs


def test_policies_resolve():
    assert resolve_train_compile(None) is None and resolve_train_compile("off") is None
    assert resolve_train_compile("auto") == "auto" and resolve_train_compile("inductor") == "inductor"
    assert TrainConfig().compile == "auto"


def test_off_and_auto_where_it_may_not_stay_eager():
    for fwd, _ in (_forward(None), _forward("auto", can_auto=False)):
        for _ in range(20):
            fwd.step_done(5.0, 100, compiled=False)
        assert not fwd.compiled and fwd.mode == "eager"


@pytest.mark.parametrize("speedup, kept", [(2.0, True), (1.0, False)])
def test_auto_compiles_after_the_budget_and_keeps_it_only_when_faster(speedup, kept):
    fwd, logs = _forward("auto", after=10.0)
    for _ in range(3):  # 9 s of eager steps: under the budget
        fwd.step_done(3.0, 100, compiled=False)
    assert not fwd.compiled
    fwd.step_done(3.0, 100, compiled=False)  # 12 s
    assert fwd.compiled and any("the eager steps took 12 s" in m for m in logs), logs
    fwd.step_done(60.0, 100, compiled=True)  # the step that compiled: not a trial
    for _ in range(TRIAL_STEPS):
        assert fwd.compiled
        fwd.step_done(3.0 / speedup, 100, compiled=True)
    assert fwd.compiled is kept
    assert fwd.mode == ("compiled" if kept else "eager (not faster)")
    assert any(("keeping them" if kept else "not faster") in m for m in logs), logs


def test_auto_does_not_compile_when_too_little_of_the_run_is_left():
    fwd, _ = _forward("auto", after=10.0)
    for left in range(30, 0, -1):  # 3 s steps: 90 s left at most, under 2 x 10 s only at the end
        fwd.step_done(3.0, 100, compiled=False, remaining_steps=left if left < 6 else 6)
    assert not fwd.compiled  # 6 steps x 3 s = 18 s < 20 s: never worth it
    fwd2, _ = _forward("auto", after=10.0)
    for _ in range(4):
        fwd2.step_done(3.0, 100, compiled=False, remaining_steps=100)
    assert fwd2.compiled


def test_a_failed_compiled_step_falls_back_to_eager():
    fwd, logs = _forward("eager")  # a backend name: compiled from the first step
    assert fwd.compiled
    fwd.failed(RuntimeError("no compiler\nmore"))
    assert not fwd.compiled and fwd.mode == "eager (fallback)"
    assert any("RuntimeError: no compiler" in m for m in logs), logs
    assert fwd(3) == ("eager", 3)


def test_trainer_reruns_a_failing_compiled_step_eagerly(tmp_path):
    """A backend that fails: the first step runs again eagerly, the log says so, and the run
    equals an eager one."""
    from torch._dynamo import register_backend

    @register_backend(name="fastchgnet_test_failing")
    def _failing(gm, example_inputs):  # noqa: ARG001
        raise RuntimeError("this backend always fails")

    xyz = _write_extxyz(tmp_path / "toy.xyz", n=12)
    torch._dynamo.reset()
    logs: list[str] = []
    a = _cfg(tmp_path / "a", xyz, epochs=1, cache=str(tmp_path / "cache"), compile="off")
    b = _cfg(tmp_path / "b", xyz, epochs=1, cache=str(tmp_path / "cache"),
             compile="fastchgnet_test_failing")
    train(a, log=lambda m: None)
    train(b, log=logs.append)
    torch._dynamo.reset()
    assert any("failed" in m and "training eagerly from now on" in m for m in logs), logs
    pa, pb = _params(Path(a.out)), _params(Path(b.out))
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=0, msg=k)


# ---- what an earlier compilation cost (fastchgnet.compile.memory) ----------------------------

@pytest.fixture
def inductor_dir(tmp_path, monkeypatch):
    """Inductor's cache folder in tmp_path, and a controllable count of its cache misses."""
    from fastchgnet.compile import memory
    from fastchgnet.compile import train as ctrain

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    misses = [0]
    monkeypatch.setattr(memory, "cache_misses", lambda: misses[0])
    monkeypatch.setattr(ctrain, "compiler_available", lambda device: (True, ""))
    monkeypatch.setattr(ctrain, "compile_callable", lambda fn, **kw: lambda b, **k: ("compiled", b))
    return tmp_path / "inductor", misses


def test_memory_round_trip_beside_inductors_cache(inductor_dir, monkeypatch):
    from fastchgnet.compile import memory

    folder, _ = inductor_dir
    assert memory.recall("k") is None and not folder.exists()  # reading creates nothing
    memory.remember("k", 100.0, 1.6, from_cache=False)
    assert (folder / memory.FILE).is_file()
    entry = memory.recall("k")
    assert entry["compile_s"] == 100.0 and entry["speedup"] == 1.6
    assert memory.expected_cost(entry) == pytest.approx(100.0 * memory.COLD_TO_WARM)
    memory.remember("k", 6.0, 1.6, from_cache=True)
    assert memory.expected_cost(memory.recall("k")) == 6.0
    memory.remember("k", 90.0, 1.6, from_cache=False, expected_cached=True)
    assert memory.expected_cost(memory.recall("k")) is None  # the cache did not keep it
    (folder / memory.FILE).write_text("{not json")
    assert memory.recall("k") is None
    with torch._inductor.config.patch(fx_graph_cache=False):
        assert memory.record_path() is None and memory.recall("k") is None


def test_step_key_tells_models_dtypes_and_tasks_apart():
    from fastchgnet import CHGNet
    from fastchgnet.compile.memory import step_key

    small = dict(atom_fea_dim=8, bond_fea_dim=8, angle_fea_dim=8, n_conv=2)
    a, b = CHGNet(**small), CHGNet(**small)
    assert step_key(a) == step_key(b)
    assert step_key(a) != step_key(a, task="ef")
    assert step_key(a) != step_key(CHGNet(**small).double())
    assert step_key(b) != step_key(CHGNet(**{**small, "n_conv": 3}))
    threads = torch.get_num_threads()
    try:  # Inductor's CPU kernels are compiled for a thread count
        torch.set_num_threads(threads + 1)
        other = step_key(a)
    finally:
        torch.set_num_threads(threads)
    assert other != step_key(a)


def _auto(key="step"):
    logs: list[str] = []
    fwd = TrainForward(lambda b, **kw: ("eager", b), "auto", device=torch.device("cpu"),
                       can_auto=True, compile_after_s=1000.0, log=logs.append, memory_key=key)
    return fwd, logs


def test_auto_compiles_early_where_this_step_compiled_before(inductor_dir):
    from fastchgnet.compile import memory
    from fastchgnet.compile.train import RECALL_AFTER_STEPS

    _, misses = inductor_dir
    fwd, _ = _auto()
    for _ in range(10):  # no record: under the budget, eager
        fwd.step_done(1.0, 100, compiled=False, remaining_steps=100)
    assert not fwd.compiled
    memory.remember("step", 60.0, 2.0, from_cache=False)  # a first compilation filled the cache
    fwd, logs = _auto()
    for i in range(RECALL_AFTER_STEPS + 1):  # the first step warms up: not counted
        assert not fwd.compiled
        fwd.step_done(1.0, 100, compiled=False, remaining_steps=75)
    # 75 s left at 2x: saves 37 s >= 1.5 x 6 s expected from the cache
    assert fwd.compiled and any("compiled here before" in m for m in logs), logs
    fwd.step_done(5.0, 100, compiled=True)  # loaded from the cache: no miss
    for _ in range(TRIAL_STEPS):
        fwd.step_done(0.5, 100, compiled=True)
    entry = memory.recall("step")
    assert entry["from_cache"] and entry["compile_s"] == 5.0 and entry["speedup"] == 2.0
    # too little left for the expected cost: eager
    fwd, _ = _auto()
    for _ in range(RECALL_AFTER_STEPS + 1):
        fwd.step_done(1.0, 100, compiled=False, remaining_steps=10)
    assert not fwd.compiled
    # a compilation expected from the cache that compiled from scratch is not counted on again
    fwd, _ = _auto()
    for _ in range(RECALL_AFTER_STEPS + 1):
        fwd.step_done(1.0, 100, compiled=False, remaining_steps=75)
    assert fwd.compiled
    misses[0] += 2
    fwd.step_done(90.0, 100, compiled=True)
    for _ in range(TRIAL_STEPS):
        fwd.step_done(0.5, 100, compiled=True)
    assert memory.expected_cost(memory.recall("step")) is None
    fwd, _ = _auto()
    for _ in range(RECALL_AFTER_STEPS + 2):
        fwd.step_done(1.0, 100, compiled=False, remaining_steps=75)
    assert not fwd.compiled


def test_compile_at_the_first_step_is_remembered(inductor_dir):
    from fastchgnet.compile import memory

    _, misses = inductor_dir
    fwd = TrainForward(lambda b, **kw: b, "inductor", device=torch.device("cpu"), can_auto=True,
                       memory_key="first")
    assert fwd.compiled
    misses[0] += 1
    fwd.step_done(100.0, 50, compiled=True)
    entry = memory.recall("first")
    assert entry["compile_s"] == 100.0 and not entry["from_cache"] and entry["speedup"] is None


def test_the_first_eager_step_is_not_the_reference(inductor_dir):
    """The run's first step warms up (allocations, lazy set-up): the speed-up a trial measures,
    and records, compares compiled steps with the eager steps after it."""
    from fastchgnet.compile import memory

    fwd, logs = _forward("auto", after=40.0)
    fwd.memory_key = "warm"
    fwd.step_done(30.0, 100, compiled=False, remaining_steps=100)  # warm-up: slow
    for _ in range(3):
        fwd.step_done(4.0, 100, compiled=False, remaining_steps=100)
    assert fwd.compiled  # 42 s of eager steps >= 40 s
    fwd.step_done(20.0, 100, compiled=True)
    for _ in range(TRIAL_STEPS):
        fwd.step_done(2.0, 100, compiled=True)
    assert any("(2.00x); keeping them" in m for m in logs), logs
    assert memory.recall("warm")["speedup"] == 2.0


@pytest.mark.parametrize("compiled_s, kept", [(1.05, True), (1.2, False)])
def test_a_recalled_compilation_goes_back_only_when_clearly_slower(inductor_dir, compiled_s, kept):
    from fastchgnet.compile import memory
    from fastchgnet.compile.train import RECALL_AFTER_STEPS

    memory.remember("step", 5.0, 2.0, from_cache=True)
    fwd, logs = _auto()
    for _ in range(RECALL_AFTER_STEPS + 1):
        fwd.step_done(1.0, 100, compiled=False, remaining_steps=75)
    assert fwd.compiled
    fwd.step_done(5.0, 100, compiled=True)
    for _ in range(TRIAL_STEPS):
        fwd.step_done(compiled_s, 100, compiled=True)
    assert fwd.compiled is kept, logs
    # the record: geometric mean with the speed-up measured before (2.0)
    assert memory.recall("step")["speedup"] == pytest.approx((2.0 / compiled_s) ** 0.5, abs=1e-3)
