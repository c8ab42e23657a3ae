"""Peers side by side: fastchgnet vs matgl's CHGNet (0.3.0 weights ported) vs ``chgnet`` (CPU).

One test per case and torch thread count (1 and 2, set for the test and restored after). Each
pytest-benchmark round runs the three implementations once each, interleaved (A B C, then
C B A, ...), so the machine's load falls on all alike; the round's own statistics are those of
the three together, and the per-implementation medians are in ``extra_info``: ``ours_ms``,
``matgl_ms``, ``chgnet_ms``, ``ratio`` (chgnet / ours, the gate's ratio), ``ratio_matgl``
(matgl / ours) and ``peer_ratios`` (``{"matgl": ratio_matgl}``, gated as ``"<group> vs matgl"``),
plus each package's largest output difference from chgnet (``diff_ours``, ``diff_matgl``: e
eV/atom, f eV/Å, s GPa, m μB) or, for the training step, each first step's loss.

Cases (see :mod:`fastchgnet.bench.peers_run`): an MD step through each ASE calculator on LiMnO2
(8 atoms), Li9Co7O16 (32; both from the shared CIFs, skipped when absent) and diamond Si cells of
64 and 512 atoms; efsm of 16 structures in one batch; a training step at batch 8.
Needs matgl (``pip install -e ".[peers]"``) and chgnet; skipped without them.
``FASTCHGNET_BENCH_PEERS_ROUNDS`` (default 5; a third of it, at least 3, for 512 atoms).

    make bench BENCH_PATHS=benchmarks/test_bench_peers.py
"""

from __future__ import annotations

import os

import pytest

from fastchgnet.bench.peers import PEERS_HINT, Interleaved, matgl_available, torch_threads

ROUNDS = int(os.environ.get("FASTCHGNET_BENCH_PEERS_ROUNDS", "5"))
THREADS = (1, 2)
MD_CASES = ("LiMnO2", "Li9Co7O16", "Si-64", "Si-512")


@pytest.fixture(scope="module")
def peers(device):
    if device != "cpu":
        pytest.skip("the peers comparison runs on the CPU")
    if not matgl_available():
        pytest.skip(PEERS_HINT)
    pytest.importorskip("chgnet", reason="chgnet (the reference and the weights' source) is not installed")
    from fastchgnet.bench.peers_run import Peers

    return Peers()


@pytest.fixture(scope="module")
def md_cells():
    from fastchgnet.bench.peers_run import md_atoms

    return md_atoms()


def _bench(benchmark, group: str, threads: int, build, rounds: int, loss: bool = False) -> None:
    with torch_threads(threads):
        fns, info = build()
        if loss:
            info.update({f"loss_{k}": float(fn()) for k, fn in fns.items()})
        timer = Interleaved(fns)
        timer.run(0, warmup=1)
        benchmark.group = group
        benchmark.pedantic(timer, rounds=rounds, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update(threads=threads, device="cpu", **info, **timer.summary())


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("name", MD_CASES)
def test_peers_md_step(benchmark, peers, md_cells, name, threads):
    if name not in md_cells:
        pytest.skip(f"{name}: the shared CIFs were not found (FASTCHGNET_BENCH_DATA or ../shared/data)")
    atoms = md_cells[name]
    rounds = max(3, ROUNDS // 3) if len(atoms) >= 256 else ROUNDS
    _bench(benchmark, f"peers md step {name} {threads}t", threads,
           lambda: peers.md_case(atoms), rounds)


@pytest.mark.parametrize("threads", THREADS)
def test_peers_predict_efsm_batch16(benchmark, peers, structures, threads):
    n = len(structures.batch)
    _bench(benchmark, f"peers predict efsm {n}x b{n} {threads}t", threads,
           lambda: peers.predict_case(structures.batch), ROUNDS)
    benchmark.extra_info["structures"] = structures.source


@pytest.mark.parametrize("threads", THREADS)
def test_peers_train_step_b8(benchmark, peers, threads):
    from fastchgnet.bench.peers_run import TRAIN_BATCH, train_case

    _bench(benchmark, f"peers train efsm b{TRAIN_BATCH} {threads}t", threads, train_case, ROUNDS,
           loss=True)
