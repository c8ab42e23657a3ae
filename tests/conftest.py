"""Shared fixtures for the fastchgnet test suite.

Expensive objects (models, the reference CHGNet and its predictions) are session-scoped so that the
slow reference runs exactly once per session.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

# Triton kernels run on the CPU through the interpreter; it must be chosen before any kernel module
# is imported. With a GPU the kernels are compiled for it instead.
# The calculator's compile="auto" compiles with Inductor once model calls have taken 60 s; a test
# run must not start a compilation half-way through (test_compile_default.py asks for it itself).
os.environ.setdefault("FASTCHGNET_COMPILE", "never")

if os.environ.get("TRITON_INTERPRET") is None:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import pytest
import torch

import fastchgnet
from fastchgnet.data.prototypes import make, random_structures

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
CIF_NAMES = {
    "LiMnO2": "mp-18767-LiMnO2.cif",
    "Li9Co7O16": "mp-1175469-Li9Co7O16.cif",
}

# Parity tolerances of the float32 comparison against the reference CHGNet 0.3.0.
TOL32 = {"e": 2e-5, "f": 2e-4, "s": 2e-3, "m": 2e-4}
# Float64 against a float64 run of the reference: the two must agree to rounding.
TOL64 = {"e": 1e-8, "f": 1e-6, "s": 1e-5, "m": 1e-7}


def shared_cif_paths() -> dict[str, Path]:
    """The shared CIFs that exist (empty dict when the shared data is absent)."""
    folder = SHARED_DATA / "structures"
    return {k: folder / v for k, v in CIF_NAMES.items() if (folder / v).is_file()}


# ------------------------------------------------------------------------------------------------
# data


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "structures").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cif_structures(shared_data):
    """{name: pymatgen Structure} of the two shared CIFs (skips if either is missing)."""
    from pymatgen.core import Structure

    paths = shared_cif_paths()
    missing = set(CIF_NAMES) - set(paths)
    if missing:
        pytest.skip(f"shared CIFs missing: {sorted(missing)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: Structure.from_file(p) for k, p in paths.items()}


def _parity_set() -> tuple[list, list[str]]:
    """Varied structures for the parity tests.

    * 18 random crystals (seed 15: random prototype, random elements, random symmetric strain up to 4 %,
      0.05 Å rattle, random supercells up to 24 atoms);
    * a 1-atom cell, a 64-atom cell with zero angles (CsI: no pair closer than 3 Å), and a few
      hand-made strained/rattled crystals that add elements;
    * the two shared CIFs (8 and 32 atoms) when the shared data is present.

    Float32 rounding of the *reference itself* reaches the float32 tolerances on some random
    structures (strongly compressed cells with stresses of hundreds of GPa, nearly collinear bond
    pairs); this fixed set was checked to keep the reference's own float32 error (float32 vs a
    float64 run of the reference) below half of every tolerance. Exactness on arbitrary structures,
    ill-conditioned ones included, is tested in float64 (``test_parity_float64``).
    """
    from pymatgen.core import Structure

    structs = list(random_structures(18, seed=15, max_atoms=24))
    ids = [f"random-{i}-{s.composition.reduced_formula}" for i, s in enumerate(structs)]
    extra = {
        "one-atom-Mo": make("simple_cubic", ["Mo"], strain=0.02),
        "zero-angles-CsI-64": make("rocksalt", ["Cs", "I"], supercell=2, rattle=0.05, seed=1),
        "BaZrO3": make("perovskite", ["Ba", "Zr", "O"], strain=0.01, rattle=0.04, seed=2),
        "Re-hcp": make("hcp", ["Re"], supercell=(2, 2, 1), rattle=0.04, seed=3),
        "CeF2": make("fluorite", ["Ce", "F"], rattle=0.04, seed=4),
        "GaN-wurtzite": make("wurtzite", ["Ga", "N"], supercell=(2, 1, 1), rattle=0.04, seed=5),
        "Pt-Ir-L12": make("l12", ["Pt", "Ir"], rattle=0.03, seed=6),
    }
    structs += list(extra.values())
    ids += list(extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, path in shared_cif_paths().items():
            structs.append(Structure.from_file(path))
            ids.append(name)
    return structs, ids


@pytest.fixture(scope="session")
def parity_data():
    return _parity_set()


@pytest.fixture(scope="session")
def parity_structures(parity_data):
    return parity_data[0]


@pytest.fixture(scope="session")
def parity_ids(parity_data):
    return parity_data[1]


@pytest.fixture(scope="session")
def ill_conditioned_structures():
    """Random crystals whose float32 predictions (reference and ours alike) carry rounding errors
    at or above the float32 tolerances: used only in the float64 exactness test."""
    picks = []
    # chgnet's own float32 force error on these is 2.1e-4 and 2.9e-4 eV/Å (above the tolerance)
    picks.append(random_structures(18, seed=5, max_atoms=24)[8])  # YNbTe3 perovskite
    picks.append(random_structures(18, seed=6, max_atoms=24)[9])  # CoPbCl3 perovskite
    return picks


# ------------------------------------------------------------------------------------------------
# models


@pytest.fixture(scope="session")
def model():
    return fastchgnet.load_model("0.3.0")


@pytest.fixture(scope="session")
def model64():
    return fastchgnet.load_model("0.3.0", dtype=torch.float64)


@pytest.fixture(scope="session")
def ref_model():
    pytest.importorskip("chgnet")
    from chgnet.model import CHGNet

    return CHGNet.load(verbose=False)


def small_config(**kw):
    cfg = dict(atom_fea_dim=16, bond_fea_dim=16, angle_fea_dim=16, num_radial=7, num_angular=7,
               n_conv=2, atom_conv_hidden_dim=16, bond_conv_hidden_dim=16, mlp_hidden_dims=(16,))
    cfg.update(kw)
    return fastchgnet.CHGNetConfig(**cfg)


@pytest.fixture
def small_model():
    """A fresh small random model (function scope: tests may modify it)."""
    torch.manual_seed(0)
    net = fastchgnet.CHGNet(small_config())
    # the AtomRef is zero at init; give it values so that its path is exercised
    with torch.no_grad():
        net.atom_ref.copy_(torch.linspace(-5.0, -1.0, net.atom_ref.numel()))
    return net.eval()


# ------------------------------------------------------------------------------------------------
# predictions (cached: the reference is slow)


def _ref_predict(ref, structures):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ref.predict_structure(structures, task="efsm", batch_size=16,
                                    return_site_energies=True, return_crystal_feas=True)
    return out if isinstance(out, list) else [out]


@pytest.fixture(scope="session")
def ref_predictions(ref_model, parity_structures):
    """Reference CHGNet 0.3.0 float32 predictions on the parity structures (computed once)."""
    return _ref_predict(ref_model, parity_structures)


@pytest.fixture(scope="session")
def our_predictions(model, parity_structures):
    return model.predict(parity_structures, task="efsm", batch_size=16,
                         return_site_energies=True, return_crystal_feas=True)


@pytest.fixture(scope="session")
def ref_model64():
    """The reference CHGNet in float64.

    The reference hard-codes float32 in two places (the graph converter's coordinate dtype and the
    AtomRef composition features); both are switched to float64 for the duration of a prediction by
    :func:`ref64_predict`.
    """
    pytest.importorskip("chgnet")
    from chgnet.model import CHGNet

    ref = CHGNet.load(verbose=False).double()
    comp = ref.composition_model

    def composition_feas(graphs):
        rows = [torch.bincount(g.atomic_number.long() - 1, minlength=comp.max_num_elements).double()
                / g.atomic_number.shape[0] for g in graphs]
        return torch.stack(rows)

    comp._assemble_graphs = composition_feas
    return ref


def ref64_predict(ref64, structures):
    import chgnet.graph.converter as conv_mod
    import chgnet.model.model as model_mod

    if not (hasattr(conv_mod, "TORCH_DTYPE") and hasattr(model_mod, "TORCH_DTYPE")):
        pytest.skip("this chgnet version has no TORCH_DTYPE switch; float64 reference unavailable")
    saved = conv_mod.TORCH_DTYPE, model_mod.TORCH_DTYPE
    conv_mod.TORCH_DTYPE = model_mod.TORCH_DTYPE = torch.float64
    try:
        return _ref_predict(ref64, structures)
    finally:
        conv_mod.TORCH_DTYPE, model_mod.TORCH_DTYPE = saved


# ------------------------------------------------------------------------------------------------
# helpers


def max_abs(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max()) if a.size else 0.0


def perturb_norms(model, scale: float = 0.1):
    """Give a fresh model non-trivial LayerNorm affines and AtomRef (in place; returns it), so that
    tests exercise those parameters instead of their identity/zero initialisation."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name == "atom_ref":
                p.add_(scale * torch.randn_like(p))
    return model


def transformed_copies(s, seed: int = 0):
    """``(rotated, R, translated, permuted, perm)`` copies of a pymatgen structure for symmetry
    tests: a random orthogonal ``R`` applied to the lattice (Cartesian ``x -> R x``), a fixed
    fractional shift, and a random atom order ``perm`` (``permuted[i] = s[perm[i]]``)."""
    from pymatgen.core import Lattice, Structure

    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    rotated = Structure(Lattice(s.lattice.matrix @ q.T), s.species, s.frac_coords)
    translated = Structure(s.lattice, s.species, s.frac_coords + np.array([0.31, -0.12, 0.57]))
    perm = np.random.default_rng(seed + 1).permutation(len(s))
    permuted = Structure(s.lattice, [s.species[i] for i in perm], s.frac_coords[perm])
    return rotated, torch.as_tensor(q), translated, permuted, perm
