"""Importing (and using) fastchgnet leaves torch's global state alone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import torch

STATE_SNIPPET = textwrap.dedent("""
    import json, os, torch
    import torch._dynamo.eval_frame

    def state():
        return {
            "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS",
                                                   "FASTCHGNET_LAUNCH_DEFAULTS", "MKL_NUM_THREADS")},
            "dynamo_cache_size_limit": torch._dynamo.config.cache_size_limit,
            "compiler_stance": str(getattr(torch._dynamo.eval_frame, "_stance", None)),
            "default_dtype": str(torch.get_default_dtype()),
            "num_threads": torch.get_num_threads(),
            "num_interop_threads": torch.get_num_interop_threads(),
            "grad_enabled": torch.is_grad_enabled(),
            "inference_mode": torch.is_inference_mode_enabled(),
            "anomaly": torch.is_anomaly_enabled(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "matmul_precision": torch.get_float32_matmul_precision(),
            "cuda_matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "fp16_reduced": torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
            "bf16_reduced": torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
            "default_device": str(torch.empty(0).device),
        }
""")


def run_python(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STATE_SNIPPET + textwrap.dedent(code)],
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_does_not_change_torch_state():
    res = run_python("""
        before = state()
        import fastchgnet
        import fastchgnet.data, fastchgnet.data.prototypes, fastchgnet.model, fastchgnet.nn
        import fastchgnet.model.weights, fastchgnet.model.predict, fastchgnet.nn.basis
        import fastchgnet.nn.layers
        try:
            import fastchgnet.kernels
        except ImportError:
            pass
        import fastchgnet.md.calculator, fastchgnet.compile.auto, fastchgnet.cli.launch
        import fastchgnet.cli
        after = state()
        print(json.dumps({"before": before, "after": after}))
    """)
    assert res["before"] == res["after"]


def test_loading_and_predicting_does_not_change_torch_state():
    res = run_python("""
        before = state()
        import fastchgnet
        from fastchgnet.data.prototypes import make
        m = fastchgnet.load_model("0.3.0")
        m.predict([make("rocksalt", ["Na", "Cl"]), make("bcc", ["Fe"])], task="efsm")
        m.predict(make("bcc", ["Fe"]), task="e")
        m64 = fastchgnet.load_model("0.3.0", dtype=torch.float64)
        m64.predict(make("bcc", ["Fe"]), task="efsm")
        after = state()
        print(json.dumps({"before": before, "after": after}))
    """)
    assert res["before"] == res["after"]


def test_in_process_state_unchanged_by_predict(model):
    from fastchgnet.data.prototypes import make

    before = (torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled())
    model.predict(make("rocksalt", ["Na", "Cl"]), task="efsm")
    with torch.no_grad():
        model.predict(make("rocksalt", ["Na", "Cl"]), task="efsm")
        assert not torch.is_grad_enabled()
    assert (torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled()) == before


def test_calculator_with_compile_policy_leaves_state_alone():
    """The calculator's compile policy (default "auto", and an explicit compile=True guard that
    is never called) changes neither the environment, torch's threads, nor Dynamo's settings."""
    res = run_python("""
        before = state()
        from fastchgnet.data.prototypes import make
        from fastchgnet.md.calculator import CHGNetCalculator
        from ase.build import bulk
        calc = CHGNetCalculator("0.3.0", device="cpu")
        atoms = bulk("Si", "diamond", a=5.43, cubic=True)
        atoms.calc = calc
        atoms.get_forces()
        CHGNetCalculator("0.3.0", device="cpu", compile=True)
        after = state()
        print(json.dumps({"before": before, "after": after}))
    """)
    assert res["before"] == res["after"]


def test_denormals_are_flushed_in_our_calls_only_and_restored(model):
    """Our CPU calls (predict, the calculator, a training step) flush float denormals for their
    own duration and restore the caller's setting, either way; outputs are unchanged."""
    from ase.build import bulk

    from fastchgnet.data.prototypes import make
    from fastchgnet.device import flush_denormals, flushing_denormals
    from fastchgnet.md.calculator import CHGNetCalculator

    s = make("rocksalt", ["Na", "Cl"], rattle=0.05, seed=1)
    seen = []
    real = model.forward

    def spy(*a, **k):
        seen.append(flushing_denormals())
        return real(*a, **k)

    assert not flushing_denormals()
    ref = model.predict(s, task="efsm")
    model.forward = spy
    try:
        out = model.predict(s, task="efsm")
        atoms = bulk("Si", "diamond", a=5.43, cubic=True)
        atoms.calc = CHGNetCalculator(model, compile=False)
        atoms.get_forces()
    finally:
        del model.forward
    assert seen == [True, True]  # flushed inside both calls ...
    assert not flushing_denormals()  # ... and restored after them
    for k in "efsm":
        np.testing.assert_array_equal(out[k], ref[k])
    torch.set_flush_denormal(True)  # a caller's own choice is kept
    try:
        with flush_denormals():
            assert flushing_denormals()
        assert flushing_denormals()
    finally:
        torch.set_flush_denormal(False)
    with flush_denormals("meta"):  # not the CPU: nothing changes
        assert not flushing_denormals()
