"""The calculator's compiled-by-default model call (``compile="auto"``) and the command's thread and
OpenMP wait-policy defaults.

Compilation here uses the ``eager`` backend (Dynamo captures the graph, so compilations and
recompilations are exactly Inductor's, but nothing is compiled to C++), except one slow test
that runs Inductor itself on an 8-atom cell.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk
from ase.md.verlet import VelocityVerlet

from fastchgnet.cli import launch
from fastchgnet.compile import auto
from fastchgnet.compile.auto import GuardedForward, compiler_available, resolve_compile
from fastchgnet.md.calculator import CHGNetCalculator
from fastchgnet.model import CHGNet

SMALL = dict(atom_fea_dim=16, bond_fea_dim=16, angle_fea_dim=16, num_radial=7, num_angular=7,
             atom_conv_hidden_dim=16, bond_conv_hidden_dim=16, mlp_hidden_dims=(16,), n_conv=3)


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    monkeypatch.delenv("FASTCHGNET_COMPILE", raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = CHGNet(**SMALL)
    with torch.no_grad():
        net.atom_ref.copy_(torch.linspace(-5.0, -1.0, net.atom_ref.numel()))
    return net.double().eval().requires_grad_(False)


def _si(reps=(1, 1, 1), seed=0):
    a = bulk("Si", "diamond", a=5.43, cubic=True).repeat(reps)  # 8 atoms per repeat
    a.rattle(0.05, seed=seed)
    return a


def _guarded(calc, **kw):
    """``calc`` with its model call guarded by the fast test backend."""
    kw.setdefault("backend", "eager")
    calc._guard = GuardedForward(calc._eager_call, device="cpu", **kw)
    return calc


def _results(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return {"e": atoms.get_potential_energy(), "f": atoms.get_forces(), "s": atoms.get_stress(),
            "m": atoms.get_magnetic_moments(), "site": calc.results["energies"]}


def _assert_same(a, b):
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-9, atol=1e-9, err_msg=k)


# ----------------------------------------------------------------------------------------------
# the policy


def test_policy_values():
    assert resolve_compile(True) == "always" and resolve_compile("auto") == "auto"
    assert resolve_compile(False) == "never" and resolve_compile(None) == "never"
    with pytest.raises(ValueError, match="compile must be"):
        resolve_compile("sometimes")
    with pytest.raises(ValueError, match="compile must be"):
        CHGNetCalculator(CHGNet(**SMALL), compile="fast")


def test_default_is_auto_and_stays_eager_for_short_jobs(model):
    """A single point or a short run never waits for a compilation: the default runs eagerly
    until the model calls have taken ``compile_after_s`` (60 s) in total."""
    calc = CHGNetCalculator(model)
    assert calc.compile_report.policy == "auto" and auto.COMPILE_AFTER_S == 60.0
    _results(calc, _si())
    rep = calc.compile_report
    assert rep.mode == "eager" and rep.compiles == 0 and rep.eager_calls == 1
    assert "60 s" in rep.reason
    assert CHGNetCalculator(model, compile=False).compile_report.policy == "never"
    assert CHGNetCalculator(model, forward=lambda b, t: {}).compile_report is None


def test_environment_overrides_the_auto_default(model, monkeypatch):
    monkeypatch.setenv("FASTCHGNET_COMPILE", "never")
    assert CHGNetCalculator(model).compile_report.policy == "never"
    assert CHGNetCalculator(model, compile=True).compile_report.policy == "always"


def test_auto_compiles_after_the_eager_budget_and_matches_eager(model, caplog):
    """Ski rental: eager calls until their total time reaches the budget, then compiled; the
    outputs equal the eager calculator's."""
    atoms = _si()
    ref = _results(CHGNetCalculator(model, compile=False), atoms)
    calc = _guarded(CHGNetCalculator(model), policy="auto", compile_after_s=1e-9)
    with caplog.at_level(logging.INFO, logger="fastchgnet"):
        first = _results(calc, atoms)          # eager: nothing spent yet
        assert calc.compile_report.mode == "eager"
        moved = atoms.copy()
        moved.positions[0, 0] += 1e-3
        second = _results(calc, moved)         # compiles
    rep = calc.compile_report
    assert rep.mode == "compiled" and rep.compiles == 1 and rep.compiled_calls == 1
    assert rep.compile_s > 0 and "compiled" in rep.summary()
    assert any("compiled the model call" in r.getMessage() for r in caplog.records)
    _assert_same(first, ref)
    _assert_same(second, _results(CHGNetCalculator(model, compile=False), moved))


def test_md_does_not_recompile_per_step(model):
    """Bonds and angles change at every MD step, and the number of atoms between runs: one
    compilation serves them all."""
    calc = _guarded(CHGNetCalculator(model), policy="always")
    atoms = _si()
    atoms.calc = calc
    rng = np.random.default_rng(0)
    atoms.set_momenta(rng.normal(scale=3.0, size=(len(atoms), 3)))  # hot: bonds change
    dyn = VelocityVerlet(atoms, timestep=2.0 * units.fs)
    n_bonds = set()
    for _ in range(15):
        dyn.run(1)
        n_bonds.add(calc.atoms_to_batch(atoms).num_bonds)
    big = _si((2, 1, 1), seed=1)
    _results(calc, big)                        # 16 atoms
    assert len(n_bonds) > 1, "the test needs bond counts that change"
    rep = calc.compile_report
    assert rep.compiles == 1, rep.events
    assert rep.eager_calls == 0 and rep.compiled_calls == 17


def test_recompilations_are_bounded(model, caplog):
    """Past ``max_compiles`` a call that would need another compilation runs eagerly (with one
    log line); calls that the compiled graphs serve stay compiled."""
    atoms = _si()
    calc = _guarded(CHGNetCalculator(model, task="efsm"), policy="always", max_compiles=1)
    with caplog.at_level(logging.WARNING, logger="fastchgnet"):
        a = _results(calc, atoms)                              # task efsm: compilation 1
        out_ef = calc.predict_batch(calc.atoms_to_batch(atoms), "ef")   # would be compilation 2
        calc.predict_batch(calc.atoms_to_batch(atoms), "ef")
    rep = calc.compile_report
    assert rep.compiles == 1 and rep.limit_hits == 2 and rep.eager_calls == 2
    assert sum("bound of 1 compilations" in r.getMessage() for r in caplog.records) == 1
    ref = CHGNetCalculator(model, compile=False)
    np.testing.assert_allclose(out_ef["f"].numpy(),
                               ref.predict_batch(ref.atoms_to_batch(atoms), "ef")["f"].numpy(),
                               rtol=1e-9, atol=1e-9)
    moved = atoms.copy()
    moved.positions[1, 2] += 1e-3
    _results(calc, moved)                                      # efsm again: compiled
    assert rep.compiled_calls == 2 and rep.mode == "compiled"
    _assert_same(a, _results(CHGNetCalculator(model, compile=False), atoms))


def test_eager_fallback_when_compilation_raises(model, caplog):
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler today")

    atoms = _si()
    calc = _guarded(CHGNetCalculator(model), policy="always", backend=broken)
    with caplog.at_level(logging.WARNING, logger="fastchgnet"):
        got = _results(calc, atoms)
        moved = atoms.copy()
        moved.positions[0, 1] += 1e-3
        _results(calc, moved)
    rep = calc.compile_report
    assert rep.mode == "eager (fallback)" and "no C++ compiler today" in rep.reason
    assert rep.eager_calls == 2 and rep.compiled_calls == 0
    lines = [r.getMessage() for r in caplog.records if "running eagerly" in r.getMessage()]
    assert len(lines) == 1 and "no C++ compiler today" in lines[0]
    _assert_same(got, _results(CHGNetCalculator(model, compile=False), atoms))


def test_eager_fallback_without_a_compiler(model, monkeypatch, caplog):
    monkeypatch.setattr(auto, "compiler_available", lambda device: (False, "C++ compiler 'g++' not found"))
    calc = CHGNetCalculator(model, compile=True)
    with caplog.at_level(logging.WARNING, logger="fastchgnet"):
        _results(calc, _si())
    assert calc.compile_report.mode == "eager (fallback)"
    assert any("'g++' not found" in r.getMessage() for r in caplog.records)


def test_an_error_of_the_structure_is_raised_not_swallowed(model):
    calc = _guarded(CHGNetCalculator(model), policy="always")

    def bad(batch, task):
        raise ValueError("bad structure")

    calc._guard.eager = bad
    with pytest.raises(ValueError, match="bad structure"):
        calc._guard(calc.atoms_to_batch(_si()), "ef")


def test_compiler_probe():
    ok, why = compiler_available("cpu")
    assert isinstance(ok, bool) and (ok or why)
    assert compiler_available("meta")[0] is False


@pytest.mark.slow
def test_inductor_calculator_matches_eager(model):
    """Inductor itself, 8 atoms, float64: the compiled calculator gives the eager results."""
    if not compiler_available("cpu")[0]:
        pytest.skip("no C++ compiler for Inductor")
    atoms = _si()
    calc = CHGNetCalculator(model, compile=True)
    got = _results(calc, atoms)
    assert calc.compile_report.mode == "compiled" and calc.compile_report.compiles == 1
    ref = _results(CHGNetCalculator(model, compile=False), atoms)
    for k in got:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-7, atol=1e-7, err_msg=k)


# ----------------------------------------------------------------------------------------------
# the command's threads and OpenMP wait policy


def test_wait_policy_default_only_when_unset():
    assert launch.env_defaults({}, glibc=False) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert launch.env_defaults({"OMP_WAIT_POLICY": "ACTIVE"}, glibc=False) == {}
    assert launch.env_defaults({"OMP_WAIT_POLICY": ""}, glibc=False) == {}


def test_malloc_default_only_on_glibc_and_when_no_allocator_is_chosen():
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert launch.env_defaults(mine, glibc=True) == {**launch.MALLOC_DEFAULTS, **launch.THP_DEFAULT}
    for chosen in ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_TRIM_THRESHOLD_",
                   "MALLOC_MMAP_THRESHOLD_"):
        assert launch.env_defaults({**mine, chosen: "x"}, glibc=True) == launch.THP_DEFAULT, chosen
    # huge pages: the user's setting (any value) is kept, the allocator settings still added
    assert launch.env_defaults({**mine, "THP_MEM_ALLOC_ENABLE": "0"}, glibc=True) \
        == launch.MALLOC_DEFAULTS
    # a relaunch for the allocator alone, when the wait policy is the user's
    if os.name == "posix" and launch._glibc():
        assert launch.relaunch(["md"], {"PATH": "", **mine}, execute=False) is not None


def test_malloc_settings_remove_page_faults_of_repeated_large_tensors():
    """The point of the allocator settings, in a fresh interpreter: 6 MB tensors made and freed
    again and again fault (almost) no new pages after 20 rounds."""
    if not launch._glibc():
        pytest.skip("glibc only")
    code = ("import resource, torch\n"
            "a = torch.ones(1536, 1024)\n"
            "for _ in range(20):\n    x = [a * 2 for _ in range(3)]; del x\n"
            "r = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(60):\n    x = [a * 2 for _ in range(3)]; del x\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r)\n")
    env = {k: v for k, v in os.environ.items() if k not in launch._ALLOCATOR_CHOSEN}
    out = subprocess.run([sys.executable, "-c", code], env={**env, **launch.MALLOC_DEFAULTS},
                         check=True, capture_output=True, text=True)
    # 1,536 here (one 6 MB tensor's pages, once); glibc's defaults: 10,000-180,000
    assert int(out.stdout.split()[-1]) < 3 * 1536


def test_relaunch_conditions(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["fastchgnet", "md", "x.cif"])
    env = {"PATH": os.environ.get("PATH", "")}
    if os.name == "posix":
        cmd = launch.relaunch(["md", "x.cif"], dict(env), execute=False)
        assert cmd is not None and cmd[0] == sys.executable
    assert launch.relaunch(["md"], {**env, "OMP_WAIT_POLICY": "ACTIVE", "GLIBC_TUNABLES": "",
                                    "THP_MEM_ALLOC_ENABLE": "0"}, execute=False) is None
    assert launch.relaunch(["--help"], dict(env), execute=False) is None
    assert launch.relaunch([], dict(env), execute=False) is None
    assert launch.relaunch(["md"], {**env, "FASTCHGNET_NO_RELAUNCH": "1"}, execute=False) is None
    assert launch.relaunch(["md"], {**env, "FASTCHGNET_LAUNCH_DEFAULTS": ""}, execute=False) is None


def test_threads_default(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert launch.set_default_threads({"FASTCHGNET_THREADS": "1"}) == 1
        with pytest.raises(ValueError, match="FASTCHGNET_THREADS"):
            launch.set_default_threads({"FASTCHGNET_THREADS": "0"})
        torch.set_num_threads(before)
        n = launch.set_default_threads({})
        assert 1 <= n <= max(before, 1) and n <= launch.usable_cpus()
        torch.set_num_threads(before)
        assert launch.set_default_threads({"OMP_NUM_THREADS": "7"}) == before  # the user's choice
    finally:
        torch.set_num_threads(before)


def test_console_script_target_is_the_launcher():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'fastchgnet = "fastchgnet.cli.launch:console_main"' in text
    for path in ("fastchgnet/__main__.py", "fastchgnet/cli/__main__.py"):
        src = (Path(__file__).resolve().parents[1] / path).read_text()
        assert "console_main()" in src


@pytest.mark.skipif(os.name != "posix", reason="the relaunch is POSIX only")
def test_relaunch_sets_the_wait_policy_before_torch_loads():
    """End to end: a command started without OMP_WAIT_POLICY re-executes itself with PASSIVE
    (libgomp reads it when torch loads); a user's value is left alone."""
    code = textwrap.dedent("""
        import os, sys
        sys.argv = ["fastchgnet", "md", "x.cif"]
        from fastchgnet.cli import launch
        launch.relaunch()
        print("POLICY", os.environ.get("OMP_WAIT_POLICY"), os.environ.get("FASTCHGNET_LAUNCH_DEFAULTS"))
    """)
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "FASTCHGNET_LAUNCH_DEFAULTS", "FASTCHGNET_NO_RELAUNCH")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert "POLICY PASSIVE" in out and "OMP_WAIT_POLICY" in out.split()[-1]
    mine = {**env, "OMP_WAIT_POLICY": "ACTIVE", "GLIBC_TUNABLES": "",  # allocator chosen too
            "THP_MEM_ALLOC_ENABLE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=mine,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert "POLICY ACTIVE None" in out


def test_auto_goes_back_to_eager_when_compiled_is_not_faster(model, caplog):
    """"auto" compares the first compiled calls of a size with its eager calls and keeps the
    faster: here the compiled function is made slow on purpose."""
    import time as _time

    def slow(gm, example_inputs):
        def run(*args):
            _time.sleep(0.5)
            return gm(*args)
        return run

    calc = _guarded(CHGNetCalculator(model, task="ef"), policy="auto", compile_after_s=1e9,
                    backend=slow)
    batch = calc.atoms_to_batch(_si())
    for _ in range(3):
        calc.predict_batch(batch, "ef")
    calc._guard.compile_after_s = 0.0
    with caplog.at_level(logging.INFO, logger="fastchgnet"):
        for _ in range(1 + auto.TRIAL_CALLS):   # the compiling call, then the trial
            calc.predict_batch(batch, "ef")
        calc.predict_batch(batch, "ef")
    rep = calc.compile_report
    assert rep.mode == "eager (compiled not faster)" and rep.compiles == 1
    assert rep.compiled_calls == 1 + auto.TRIAL_CALLS and rep.eager_calls == 4
    assert any("not faster here" in r.getMessage() for r in caplog.records)
