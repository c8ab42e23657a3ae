"""Device graphs and large-cell MD steps, fastchgnet vs the reference chgnet.

* ``graph`` — one crystal graph from positions: fastchgnet's device graph (``ours``: a fresh
  cell-list build in torch on the benchmark device), its numpy host builder (``host``: not in the
  ratio) and chgnet's ``CrystalGraphConverter`` (``chgnet``). Cases: the 864-atom supercell and a
  2,000+ atom cell.
* ``graph step`` — the per-MD-step graph cost with a Verlet skin (the list is reused and filtered
  on the device; ours only).
* ``md step`` — one MD step with the 0.3.0 model, forces only, of a 2,000+ atom cell on CUDA (a
  256-atom cell on the CPU: chgnet needs more than 14 GB of host memory for 864 atoms): our
  ``BatchedMD`` step (device graph with skin + forward) vs chgnet's ``predict_structure`` (graph
  conversion + forward), which is what its ASE calculator runs per step. On CUDA
  ``extra_info`` has the peak memory (``torch.cuda.max_memory_allocated``) of one step.
* ``largest cell`` (CUDA only, ``FASTCHGNET_BENCH_LARGEST=1``): the largest supercell whose MD
  step fits, for both implementations (doubling the cell until an out-of-memory error).

Run: ``python -m pytest benchmarks/test_bench_device_graph.py --benchmark-only`` (device from
``FASTCHGNET_BENCH_DEVICE``); about 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import fastchgnet
from fastchgnet.bench.common import peak_memory_mib, synced
from fastchgnet.data.device_graph import VerletGraph, device_graph, graph_inputs
from fastchgnet.sim import BatchedMD

IMPLS = ("chgnet", "host", "ours")


def _cell(structures, case: str):
    if case == "supercell":
        return structures.large, structures.names[2]
    big = structures.medium.copy()
    reps = max(1, round((2048 / len(big)) ** (1 / 3)))
    big.make_supercell(reps)
    while len(big) < 2000:
        big.make_supercell((2, 1, 1))
    return big, f"{structures.names[1]} {len(big)} atoms"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ("supercell", "2k"))
def test_graph(benchmark, request, ratio_book, structures, device, case, impl):
    s, label = _cell(structures, case)
    host = fastchgnet.build_graph(s)
    gi = graph_inputs([s], device, torch.float32)
    if impl == "ours":
        fn = synced(lambda: device_graph(gi.atomic_numbers, gi.positions, gi.lattice, gi.n_atoms,
                                         gi.pbc), device)
        b = fn()
        assert (b.num_bonds, b.num_angles) == (host.n_bonds, host.n_angles)
    elif impl == "host":
        fn = lambda: fastchgnet.build_graph(s)  # noqa: E731
    else:
        conv = request.getfixturevalue("ref_converter")
        fn = lambda: conv(s)  # noqa: E731
        assert int(fn().atom_graph.shape[0]) == host.n_directed_bonds
    benchmark.group = f"device graph {label}"
    benchmark.extra_info.update(case=case, structure=label, device=device if impl == "ours" else "cpu",
                                atoms=host.n_atoms, bonds=host.n_bonds, angles=host.n_angles)
    rounds = 3 if impl == "chgnet" else 10
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    ratio_book.record(benchmark, impl)


def test_graph_step_with_skin(benchmark, structures, device):
    """The graph of one MD step when the Verlet list is reused (no rebuild)."""
    s, label = _cell(structures, "2k")
    gi = graph_inputs([s], device, torch.float32)
    vg = VerletGraph(skin=1.0)
    vg.update(gi.atomic_numbers, gi.positions, gi.lattice, gi.n_atoms, gi.pbc)
    pos = gi.positions + 0.01
    fn = synced(lambda: vg.update(gi.atomic_numbers, pos, gi.lattice, gi.n_atoms, gi.pbc), device)
    benchmark.group = f"device graph step {label}"
    benchmark.extra_info.update(structure=label, device=device, atoms=len(s))
    benchmark.pedantic(fn, rounds=10, warmup_rounds=1, iterations=1)
    assert vg.n_builds == 1


@pytest.mark.parametrize("impl", ("chgnet", "ours"))
def test_md_step(benchmark, request, ratio_book, structures, device, our_model, impl):
    if device.startswith("cuda"):
        s, label = _cell(structures, "2k")
    else:
        s = structures.medium.copy()
        s.make_supercell(2)
        label = f"{structures.names[1]} {len(s)} atoms"
    if impl == "ours":
        md = BatchedMD(our_model, [s], timestep=1.0, init_temperature=300.0, seed=0)
        fn = synced(md.step, device)
    else:
        ref = request.getfixturevalue("ref_model")

        def fn():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return ref.predict_structure(s, task="ef")
        fn = synced(fn, device)
    fn()
    benchmark.group = f"md step {label}"
    benchmark.extra_info.update(structure=label, device=device, atoms=len(s), task="ef",
                                peak_mib=peak_memory_mib(fn, device))
    benchmark.pedantic(fn, rounds=2 if impl == "chgnet" and device == "cpu" else 5,
                       warmup_rounds=0, iterations=1)
    ratio_book.record(benchmark, impl)


@pytest.mark.skipif(not (torch.cuda.is_available() and os.environ.get("FASTCHGNET_BENCH_LARGEST")),
                    reason="CUDA and FASTCHGNET_BENCH_LARGEST=1")
@pytest.mark.parametrize("impl", ("chgnet", "ours"))
def test_largest_cell(benchmark, request, structures, device, our_model, impl):
    """Largest supercell of the medium cell whose MD step (forces) fits in GPU memory."""
    ref = request.getfixturevalue("ref_model") if impl == "chgnet" else None
    base = structures.medium
    reps, largest, peak = [1, 1, 1], 0, None
    for k in range(30):
        s = base.copy()
        s.make_supercell(reps)
        try:
            torch.cuda.empty_cache()
            if impl == "ours":
                md = BatchedMD(our_model, [s], timestep=1.0, init_temperature=300.0)
                fn = md.step
            else:
                fn = lambda: ref.predict_structure(s, task="ef")  # noqa: E731
            peak = peak_memory_mib(fn, "cuda")
        except torch.OutOfMemoryError:
            break
        largest = len(s)
        reps[k % 3] += 1
    benchmark.extra_info.update(impl=impl, largest_atoms=largest, peak_mib=peak,
                                gpu=torch.cuda.get_device_name())
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
