"""Physical consistency of the float64 model: symmetries, derivatives, batching, autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

import fastchgnet
from fastchgnet.data.prototypes import make
from conftest import max_abs

EV_A3_TO_GPA = 160.21766208


def small_structures():
    return {
        "NaCl-rattled": make("rocksalt", ["Na", "Cl"], strain=0.02, rattle=0.06, seed=1),
        "LiCoO2-strained": make("layered", ["Li", "Co", "O"],
                                strain=np.array([[0.02, 0.01, 0], [0.01, -0.01, 0.005], [0, 0.005, 0.03]]),
                                rattle=0.05, seed=2),
        "SrTiO3-rattled": make("perovskite", ["Sr", "Ti", "O"], rattle=0.05, seed=12),
        "Fe-bcc-222": make("bcc", ["Fe"], supercell=2, rattle=0.05, seed=4),
        "TiO2-rutile-strained": make("rutile", ["Ti", "O"],
                                     strain=np.array([[-0.02, 0.015, 0], [0.015, 0.01, -0.01],
                                                      [0, -0.01, 0.02]]),
                                     rattle=0.05, seed=27),
    }


STRUCTS = small_structures()
NAMES = list(STRUCTS)


def random_rotation(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def with_geometry(s: Structure, lattice: np.ndarray, cart: np.ndarray) -> Structure:
    return Structure(Lattice(lattice), s.species, cart, coords_are_cartesian=True)


@pytest.fixture(scope="module")
def base_predictions(model64):
    return {k: model64.predict(s, task="efsm") for k, s in STRUCTS.items()}


# ------------------------------------------------------------------------------------------------
# symmetries


@pytest.mark.parametrize("name", NAMES)
def test_rotation_invariance_and_covariance(model64, base_predictions, name):
    s = STRUCTS[name]
    p = base_predictions[name]
    R = random_rotation(NAMES.index(name))
    # rotate every vector v -> R v; rows of the lattice and of the positions are vectors
    rot = with_geometry(s, s.lattice.matrix @ R.T, s.cart_coords @ R.T)
    q = model64.predict(rot, task="efsm")
    assert abs(float(q["e"]) - float(p["e"])) < 1e-10
    np.testing.assert_allclose(q["f"], p["f"] @ R.T, rtol=0, atol=1e-8)
    np.testing.assert_allclose(q["s"], R @ p["s"] @ R.T, rtol=0, atol=1e-7)
    np.testing.assert_allclose(q["m"], p["m"], rtol=0, atol=1e-10)
    # the check is not vacuous: forces and stress are not zero
    assert np.abs(p["f"]).max() > 1e-3 and np.abs(p["s"]).max() > 1e-2


@pytest.mark.parametrize("name", NAMES)
def test_translation_invariance(model64, base_predictions, name):
    s = STRUCTS[name]
    p = base_predictions[name]
    shifted = with_geometry(s, s.lattice.matrix, s.cart_coords + np.array([0.37, -1.21, 2.93]))
    # also move one atom by a lattice vector: the same crystal
    cart = s.cart_coords.copy()
    cart[0] += s.lattice.matrix[0] - 2 * s.lattice.matrix[2]
    wrapped = with_geometry(s, s.lattice.matrix, cart)
    for q in model64.predict([shifted, wrapped], task="efsm"):
        assert abs(float(q["e"]) - float(p["e"])) < 1e-10
        np.testing.assert_allclose(q["f"], p["f"], rtol=0, atol=1e-8)
        np.testing.assert_allclose(q["s"], p["s"], rtol=0, atol=1e-7)
        np.testing.assert_allclose(q["m"], p["m"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_permutation_invariance_and_equivariance(model64, base_predictions, name):
    s = STRUCTS[name]
    p = base_predictions[name]
    perm = np.random.default_rng(5).permutation(len(s))
    permuted = Structure(s.lattice, [s.species[i] for i in perm], s.frac_coords[perm])
    q = model64.predict(permuted, task="efsm", return_site_energies=True)
    assert abs(float(q["e"]) - float(p["e"])) < 1e-10
    np.testing.assert_allclose(q["f"], p["f"][perm], rtol=0, atol=1e-8)
    np.testing.assert_allclose(q["m"], p["m"][perm], rtol=0, atol=1e-10)
    np.testing.assert_allclose(q["s"], p["s"], rtol=0, atol=1e-7)
    site = model64.predict(s, task="e", return_site_energies=True)["site_energies"]
    np.testing.assert_allclose(q["site_energies"], site[perm], rtol=0, atol=1e-10)


def test_supercell_is_extensive(model64):
    """A 2x1x2 supercell has the same energy per atom, the same stress, and the same forces and
    moments on the copies of each atom."""
    s = make("rocksalt", ["Mg", "O"], rattle=0.05, seed=11)
    sc = s * (2, 1, 2)
    p, q = model64.predict([s, sc], task="efsm")
    assert abs(float(q["e"]) - float(p["e"])) < 1e-9
    np.testing.assert_allclose(q["s"], p["s"], rtol=0, atol=1e-6)
    # map each supercell site back to its original site through the original lattice
    frac = s.lattice.get_fractional_coords(sc.cart_coords)
    d = frac[:, None, :] - s.frac_coords[None, :, :]
    d -= np.round(d)
    origin = np.argmin(np.linalg.norm(d @ s.lattice.matrix, axis=2), axis=1)
    assert np.bincount(origin, minlength=len(s)).tolist() == [4] * len(s)
    np.testing.assert_allclose(q["f"], p["f"][origin], rtol=0, atol=1e-8)
    np.testing.assert_allclose(q["m"], p["m"][origin], rtol=0, atol=1e-9)


def test_stress_is_symmetric(model64, base_predictions):
    for name, p in base_predictions.items():
        np.testing.assert_allclose(p["s"], p["s"].T, rtol=0, atol=1e-8, err_msg=name)


def test_forces_sum_to_zero(model64, base_predictions):
    for name, p in base_predictions.items():
        np.testing.assert_allclose(p["f"].sum(axis=0), 0.0, rtol=0, atol=1e-9, err_msg=name)


def test_stress_sign_tensile_positive(model64):
    """Stretched silicon pulls inward (positive, tensile stress); squeezed silicon pushes out."""
    base = Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.43), ["Si"], [[0, 0, 0]])
    out = []
    for scale in (0.95, 1.05):
        s = base.copy()
        s.scale_lattice(base.volume * scale**3)
        out.append(model64.predict(s, task="efs")["s"])
    squeezed, stretched = out
    assert np.all(np.diag(squeezed) < -1.0)
    assert np.all(np.diag(stretched) > 1.0)


# ------------------------------------------------------------------------------------------------
# derivatives against finite differences of the energy


def total_energies(model, structures) -> np.ndarray:
    out = model.predict(structures, task="e", batch_size=64)
    return np.array([float(o["e"]) * len(s) for o, s in zip(out, structures)])


def richardson(values_h: np.ndarray, values_2h: np.ndarray) -> np.ndarray:
    """Combine central differences at steps h and 2h: the O(h^2) error cancels."""
    return (4 * values_h - values_2h) / 3


FD_CASES = ["NaCl-rattled", "TiO2-rutile-strained", "SrTiO3-rattled"]
FD_CUTOFF_MARGIN = 0.009  # Å


def test_fd_cases_keep_clear_of_the_cutoffs():
    """The cutoff envelope is only C2 at 3 and 6 Å (its third derivative jumps), which breaks the
    smoothness Richardson extrapolation relies on. The finite-difference cases therefore have no
    atom pair within FD_CUTOFF_MARGIN of either cutoff (the stencils move bonds by < 2e-3 Å)."""
    for name in FD_CASES:
        _, _, _, d = STRUCTS[name].get_neighbor_list(r=6.2)
        assert min(np.abs(d - 3).min(), np.abs(d - 6).min()) > FD_CUTOFF_MARGIN, name


@pytest.mark.parametrize("name", FD_CASES)
def test_forces_match_finite_differences(model64, base_predictions, name):
    """F = -dE/dx, E = e * n_atoms, by central differences with steps of 1e-4 and 2e-4 Å.

    (Plain central differences at 1e-4 Å carry a truncation error of ~1e-5 eV/Å here, which
    shrinks as h^2; the Richardson combination removes it.)"""
    s = STRUCTS[name]
    h = 1e-4
    cart = s.cart_coords
    displaced = []
    for step in (h, 2 * h):
        for i in range(len(s)):
            for k in range(3):
                for sign in (1, -1):
                    c = cart.copy()
                    c[i, k] += sign * step
                    displaced.append(with_geometry(s, s.lattice.matrix, c))
    e = total_energies(model64, displaced).reshape(2, len(s), 3, 2)
    d = (e[..., 0] - e[..., 1]) / (2 * np.array([h, 2 * h]))[:, None, None]
    f_fd = -richardson(d[0], d[1])
    f = base_predictions[name]["f"]
    assert np.abs(f).max() > 1e-2
    np.testing.assert_allclose(f, f_fd, rtol=0, atol=1e-7)
    # the plain central difference agrees to its own truncation error
    np.testing.assert_allclose(f, -d[0], rtol=0, atol=5e-5)


@pytest.mark.parametrize("name", FD_CASES)
def test_stress_matches_strain_derivative(model64, base_predictions, name):
    """sigma_ij = (1/V) dE/d(eps_ij) [GPa] for lattice' = L (I + eps), fractional coordinates fixed
    (so positions follow: x' = x (I + eps)); positive = tensile."""
    s = STRUCTS[name]
    h = 1e-4
    L = s.lattice.matrix
    strained = []
    for step in (h, 2 * h):
        for i in range(3):
            for j in range(3):
                for sign in (1, -1):
                    eps = np.zeros((3, 3))
                    eps[i, j] = sign * step
                    M = np.eye(3) + eps
                    strained.append(Structure(Lattice(L @ M), s.species, s.frac_coords))
                    np.testing.assert_allclose(strained[-1].cart_coords, s.cart_coords @ M,
                                               atol=1e-10)
    e = total_energies(model64, strained).reshape(2, 3, 3, 2)
    d = (e[..., 0] - e[..., 1]) / (2 * np.array([h, 2 * h]))[:, None, None]
    s_fd = richardson(d[0], d[1]) / s.volume * EV_A3_TO_GPA
    stress = base_predictions[name]["s"]
    assert np.abs(stress).max() > 0.1
    np.testing.assert_allclose(stress, s_fd, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# batches


def test_no_gradient_leak_between_structures(model64):
    a = STRUCTS["NaCl-rattled"]
    b = STRUCTS["SrTiO3-rattled"]
    b2 = with_geometry(b, b.lattice.matrix * 1.01,
                       b.cart_coords * 1.01 + np.random.default_rng(0).normal(0, 0.05, (len(b), 3)))
    ga, gb, gb2 = fastchgnet.build_graphs([a, b, b2])
    na = len(a)

    def run(graphs):
        out = model64(fastchgnet.collate(graphs, dtype=torch.float64), task="efsm")
        return {k: v.detach().numpy() for k, v in out.items()}

    alone = run([ga])
    ab, ab2, b2a = run([ga, gb]), run([ga, gb2]), run([gb2, ga])
    # structure B really changed
    assert max_abs(ab["f"][na:], ab2["f"][na:]) > 1e-3
    for out, sl, g in ((ab, slice(0, na), 0), (ab2, slice(0, na), 0), (b2a, slice(len(b), None), 1)):
        np.testing.assert_allclose(out["f"][sl], alone["f"], rtol=0, atol=1e-10)
        np.testing.assert_allclose(out["m"][sl], alone["m"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(out["s"][g], alone["s"][0], rtol=0, atol=1e-9)
        assert abs(out["e"][g] - alone["e"][0]) < 1e-12
    # and B in the batch equals B alone
    b_alone = run([gb2])
    np.testing.assert_allclose(ab2["f"][na:], b_alone["f"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(ab2["s"][1], b_alone["s"][0], rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# training: second derivatives


def _force_stress_loss(net, batch, wf, ws):
    out = net(batch, task="efsm", create_graph=True)
    return (out["f"] * wf).sum() + (out["s"] * ws).sum() + out["e"].sum(), out


def test_create_graph_force_loss_is_differentiable(small_model):
    net = small_model.double()
    structs = [STRUCTS["NaCl-rattled"], STRUCTS["SrTiO3-rattled"]]
    batch = fastchgnet.collate(fastchgnet.build_graphs(structs), dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    wf = torch.randn(batch.num_atoms, 3, generator=gen, dtype=torch.float64)
    ws = torch.randn(batch.num_graphs, 3, 3, generator=gen, dtype=torch.float64) * 0.01
    net.train()
    loss, out = _force_stress_loss(net, batch, wf, ws)
    assert out["f"].requires_grad and out["s"].requires_grad
    net.zero_grad()
    loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    # parameters that cannot influence the energy: the magnetic-moment head, and the angle
    # update of the last block (its output is never read, as in the reference)
    last_angle = f"angle_updates.{net.config.n_conv - 2}."
    unused = [n for n in grads if n.startswith(("site_wise", last_angle))]
    missing = [n for n, g in grads.items() if g is None and n not in unused]
    assert not missing, missing
    nonzero = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
    assert "atom_embedding.weight" in nonzero
    assert "rbf_ag.frequencies" in nonzero and "angle_basis.frequencies" in nonzero
    assert len(nonzero) >= 0.8 * len(grads), sorted(set(grads) - set(nonzero))

    # the gradient of the force/stress loss is the right one: central finite difference in one
    # weight of the readout and one weight of the first atom convolution
    for pname, idx in (("readout.0.weight", (3, 5)), ("atom_convs.0.w_atom", (2, 7))):
        param = dict(net.named_parameters())[pname]
        analytic = float(param.grad[idx])
        h = 1e-5
        vals = []
        for sign in (1, -1):
            with torch.no_grad():
                param[idx] += sign * h
            vals.append(float(_force_stress_loss(net, batch, wf, ws)[0]))
            with torch.no_grad():
                param[idx] -= sign * h
        fd = (vals[0] - vals[1]) / (2 * h)
        assert abs(analytic) > 1e-6, pname
        assert abs(analytic - fd) <= 1e-5 * max(1.0, abs(fd)), (pname, analytic, fd)


def test_no_create_graph_in_eval(small_model):
    batch = fastchgnet.collate(fastchgnet.build_graphs([STRUCTS["NaCl-rattled"]]))
    small_model.eval()
    out = small_model(batch, task="efs")
    assert not out["f"].requires_grad and not out["s"].requires_grad
    out = small_model(batch, task="efs", create_graph=True)
    assert out["f"].requires_grad
