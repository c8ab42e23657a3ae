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
