"""One MD step (ASE velocity Verlet + calculator), fastchgnet's CHGNetCalculator vs chgnet's.

Cases: LiMnO2 (8 atoms) and Li9Co7O16 (32 atoms) from the shared CIFs when present, a 32-atom
rocksalt NiO cell and a 64-atom diamond Si cell (:func:`fastchgnet.bench.md.md_structures`).
A step is ``VelocityVerlet.run(1)``: integrator, graph construction and one efsm model call. The
same measurement with interleaved timing: ``python -m fastchgnet.bench.md``.

``extra_info``: atoms, directed bonds, angles, device, ratio (chgnet / ours).
"""

from __future__ import annotations

import pytest

from fastchgnet.bench.common import quiet, synced
from fastchgnet.bench.md import md_stepper, md_structures
from fastchgnet.md.calculator import CHGNetCalculator

IMPLS = ("chgnet", "ours")
ROUNDS = 10  # steps per implementation and case, after 2 warm-up steps
CASES = md_structures()


@pytest.fixture(scope="module")
def our_calc(our_model):
    return CHGNetCalculator(our_model)


@pytest.fixture(scope="module")
def ref_calc(ref_model, device):
    with quiet():
        from chgnet.model.dynamics import CHGNetCalculator as RefCalculator

        return RefCalculator(model=ref_model, use_device=device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CASES))
def test_md_step(benchmark, request, ratio_book, device, our_calc, name: str, impl: str) -> None:
    atoms = CASES[name]
    calc = our_calc if impl == "ours" else request.getfixturevalue("ref_calc")
    step = md_stepper(atoms, calc)

    def call():
        with quiet():
            return step()

    batch = our_calc.atoms_to_batch(atoms)
    benchmark.group = f"md step {name}"
    benchmark.extra_info.update(n_atoms=len(atoms), n_bonds=2 * batch.num_bonds,
                                n_angles=batch.num_angles, device=device)
    benchmark.pedantic(synced(call, device), rounds=ROUNDS, warmup_rounds=2, iterations=1)
    ratio_book.record(benchmark, impl)
