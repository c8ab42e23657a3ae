"""A chgnet user's script with one import changed: ``chgnet.model`` vs ``fastchgnet.compat.chgnet.model``.

The same calls, with each package's defaults: ``CHGNet.load()`` then ``predict_structure(s)``
(e, f, s, m), and ``MolecularDynamics(atoms, model, ensemble="nvt")`` (chgnet's Berendsen, 2 fs)
stepped with ``run(1)``. Cases: the small (LiMnO2) and medium (Li9Co7O16) benchmark structures.
The same measurement interleaved in one process: ``python scripts/compat_speed.py``.

``extra_info``: atoms, device, ratio (chgnet / compat).
"""

from __future__ import annotations

import pytest

from fastchgnet.bench.common import quiet

IMPLS = ("chgnet", "ours")
ROUNDS = 10


@pytest.fixture(scope="module")
def models(ref_model):
    with quiet():
        from fastchgnet.compat.chgnet.model import CHGNet

        return {"chgnet": ref_model, "ours": CHGNet.load(use_device="cpu")}


def _cases(structures):
    return {structures.names[0]: structures.small, structures.names[1]: structures.medium}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", [0, 1])
def test_compat_predict_structure(benchmark, ratio_book, device, structures, models, size, impl):
    if device != "cpu":
        pytest.skip("the compat comparison runs on the CPU")
    name, s = list(_cases(structures).items())[size]
    model = models[impl]

    def call():
        with quiet():
            return model.predict_structure(s)

    benchmark.group = f"compat predict_structure {name}"
    benchmark.extra_info.update(n_atoms=len(s), device=device)
    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    ratio_book.record(benchmark, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", [0, 1])
def test_compat_md_step(benchmark, ratio_book, device, structures, models, size, impl):
    if device != "cpu":
        pytest.skip("the compat comparison runs on the CPU")
    name, s = list(_cases(structures).items())[size]
    with quiet():
        if impl == "chgnet":
            from chgnet.model.dynamics import MolecularDynamics
        else:
            from fastchgnet.compat.chgnet.model.dynamics import MolecularDynamics
        md = MolecularDynamics(atoms=s, model=models[impl], ensemble="nvt", temperature=300,
                               trajectory=None, logfile=None, loginterval=10_000)

    def call():
        with quiet():
            md.run(1)

    benchmark.group = f"compat md step {name}"
    benchmark.extra_info.update(n_atoms=len(s), device=device)
    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    ratio_book.record(benchmark, impl)
