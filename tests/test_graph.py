"""Crystal graphs: edge and angle sets against the reference CHGNet converter, and invariants."""

from __future__ import annotations

import numpy as np
import pytest

import fastchgnet
from fastchgnet.data.prototypes import make, random_structures

# ------------------------------------------------------------------------------------------------
# helpers: graphs as sets of hashable keys


def our_edge_keys(g) -> list[tuple]:
    src, dst, img = g.directed_bonds()
    return [(int(a), int(b), tuple(int(x) for x in i)) for a, b, i in zip(src, dst, img)]


def our_angle_keys(g) -> list[tuple]:
    def leg(u, sign):
        if sign > 0:
            return (int(g.bond_src[u]), int(g.bond_dst[u]), tuple(int(x) for x in g.bond_image[u]))
        return (int(g.bond_dst[u]), int(g.bond_src[u]), tuple(-int(x) for x in g.bond_image[u]))

    return [
        (int(c), leg(b1, s1), leg(b2, s2))
        for c, b1, s1, b2, s2 in zip(g.angle_center, g.angle_bond1, g.angle_sign1,
                                     g.angle_bond2, g.angle_sign2)
    ]


def ref_graph_keys(structure, atom_cutoff=6.0, bond_cutoff=3.0):
    pytest.importorskip("chgnet")
    from chgnet.graph import CrystalGraphConverter

    conv = CrystalGraphConverter(atom_graph_cutoff=atom_cutoff, bond_graph_cutoff=bond_cutoff)
    rg = conv(structure)
    ag = rg.atom_graph.numpy().astype(np.int64)
    img = np.rint(rg.neighbor_image.numpy()).astype(np.int64)
    bg = rg.bond_graph.numpy().astype(np.int64).reshape(-1, 5)
    edges = [(int(a), int(b), tuple(int(x) for x in i)) for (a, b), i in zip(ag, img)]
    angles = [(int(row[0]), edges[row[2]], edges[row[4]]) for row in bg]
    return edges, angles


def assert_same_graph_as_reference(structure, **cutoffs):
    ref_edges, ref_angles = ref_graph_keys(structure, *cutoffs.values())
    g = fastchgnet.build_graph(structure, **cutoffs)
    edges, angles = our_edge_keys(g), our_angle_keys(g)
    # no duplicates on either side, so set equality is multiset equality
    assert len(set(edges)) == len(edges)
    assert len(set(ref_edges)) == len(ref_edges)
    assert len(set(angles)) == len(angles)
    missing, extra = set(ref_edges) - set(edges), set(edges) - set(ref_edges)
    assert not missing and not extra, f"edges: {len(missing)} missing, {len(extra)} extra"
    missing, extra = set(ref_angles) - set(angles), set(angles) - set(ref_angles)
    assert not missing and not extra, f"angles: {len(missing)} missing, {len(extra)} extra"
    assert g.n_directed_bonds == len(ref_edges)
    assert g.n_angles == len(ref_angles)
    return g


# ------------------------------------------------------------------------------------------------
# against the reference converter


@pytest.mark.parametrize("name, n_dir, n_ang", [("LiMnO2", 672, 744), ("Li9Co7O16", 3560, 8376)])
def test_cif_graph_counts(cif_structures, name, n_dir, n_ang):
    g = fastchgnet.build_graph(cif_structures[name])
    assert g.n_directed_bonds == n_dir
    assert g.n_bonds * 2 == n_dir
    assert g.n_angles == n_ang
    assert len(g.directed_bonds()[0]) == n_dir


@pytest.mark.parametrize("name", ["LiMnO2", "Li9Co7O16"])
def test_cif_graph_matches_reference(cif_structures, name):
    assert_same_graph_as_reference(cif_structures[name])


RANDOM_GRAPH_STRUCTURES = random_structures(8, seed=21, max_atoms=24)


@pytest.mark.parametrize("i", range(len(RANDOM_GRAPH_STRUCTURES)))
def test_random_graph_matches_reference(i):
    assert_same_graph_as_reference(RANDOM_GRAPH_STRUCTURES[i])


def test_graph_matches_reference_other_cutoffs():
    s = make("rocksalt", ["Mg", "O"], strain=0.02, rattle=0.05, seed=7)
    g = assert_same_graph_as_reference(s, atom_cutoff=4.5, bond_cutoff=2.5)
    assert g.atom_cutoff == 4.5 and g.bond_cutoff == 2.5
    assert g.bond_length.max() <= 4.5 + 1e-9


def test_graph_matches_reference_with_sites_outside_cell():
    """Fractional coordinates outside [0, 1) must not change the graph (same images found)."""
    from pymatgen.core import Structure

    s = make("perovskite", ["Sr", "Ti", "O"], rattle=0.03, seed=3)
    frac = s.frac_coords.copy()
    frac[0] += [1.0, -1.0, 2.0]
    frac[2] -= [0.0, 1.0, 0.0]
    moved = Structure(s.lattice, s.species, frac)
    assert (moved.frac_coords < 0).any() or (moved.frac_coords >= 1).any()
    assert_same_graph_as_reference(moved)


# ------------------------------------------------------------------------------------------------
# invariants of our graphs


GRAPH_CASES = [
    make("diamond", ["Si"], rattle=0.03, seed=1),
    make("layered", ["Li", "Co", "O"], strain=0.01, rattle=0.03, seed=2),
    make("simple_cubic", ["Cu"]),  # 1 atom: all bonds are to its own images
    make("bcc", ["Fe"], supercell=2, rattle=0.05, seed=3),
]


@pytest.mark.parametrize("s", GRAPH_CASES, ids=lambda s: s.composition.reduced_formula)
def test_directed_undirected_consistency(s):
    g = fastchgnet.build_graph(s)
    src, dst, img = g.directed_bonds()
    n = g.n_bonds
    assert src.shape == dst.shape == (2 * n,) and img.shape == (2 * n, 3)
    d2u = g.directed2undirected()
    counts = np.bincount(d2u, minlength=n)
    assert counts.shape == (n,) and (counts == 2).all()
    # the two directed bonds of an undirected bond are reverses of each other
    for k in range(n):
        a, b = np.flatnonzero(d2u == k)
        assert src[a] == dst[b] and dst[a] == src[b]
        assert np.array_equal(img[a], -img[b])
    # directed bonds are unique
    keys = our_edge_keys(g)
    assert len(set(keys)) == len(keys)
    # stored lengths are the lengths of the bond vectors, within the cutoff
    vec = g.positions[g.bond_src] - g.positions[g.bond_dst] - g.bond_image @ g.lattice
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), g.bond_length, rtol=0, atol=1e-9)
    assert (g.bond_length <= g.atom_cutoff + 1e-9).all()
    assert (g.bond_length > 0).all()


@pytest.mark.parametrize("s", GRAPH_CASES, ids=lambda s: s.composition.reduced_formula)
def test_no_self_pair_at_zero_image(s):
    g = fastchgnet.build_graph(s)
    src, dst, img = g.directed_bonds()
    self_zero = (src == dst) & (img == 0).all(axis=1)
    assert not self_zero.any()


@pytest.mark.parametrize("s", GRAPH_CASES, ids=lambda s: s.composition.reduced_formula)
def test_angle_legs_are_short_bonds_leaving_the_centre(s):
    g = fastchgnet.build_graph(s)
    for b, sign in ((g.angle_bond1, g.angle_sign1), (g.angle_bond2, g.angle_sign2)):
        assert set(np.unique(sign)).issubset({-1, 1})
        leg_src = np.where(sign > 0, g.bond_src[b], g.bond_dst[b])
        assert np.array_equal(leg_src, g.angle_center)
        assert (g.bond_length[b] < g.bond_cutoff).all()
    # the two legs are different directed bonds
    same = (g.angle_bond1 == g.angle_bond2) & (g.angle_sign1 == g.angle_sign2)
    assert not same.any()
    # every ordered pair of distinct short directed bonds at a centre is an angle
    src, dst, img = g.directed_bonds()
    short = np.concatenate([g.bond_length, g.bond_length]) < g.bond_cutoff
    per_atom = np.bincount(src[short], minlength=g.n_atoms)
    assert g.n_angles == int((per_atom * (per_atom - 1)).sum())


def test_one_atom_cell_graph():
    s = make("simple_cubic", ["Cu"])
    assert len(s) == 1
    g = fastchgnet.build_graph(s)
    assert g.n_atoms == 1 and g.n_bonds > 0 and g.n_angles > 0
    assert (g.bond_src == 0).all() and (g.bond_dst == 0).all()
    assert not (g.bond_image == 0).all(axis=1).any()


def test_zero_angle_graph():
    from pymatgen.core import Lattice, Structure

    s = Structure(Lattice.cubic(3.4), ["K"], [[0, 0, 0]])  # nearest neighbour 3.4 Å > 3 Å
    g = fastchgnet.build_graph(s)
    assert g.n_bonds > 0
    assert g.n_angles == 0
    assert g.angle_center.shape == (0,)


# ------------------------------------------------------------------------------------------------
# ASE input


@pytest.mark.parametrize("s", GRAPH_CASES + [make("wurtzite", ["Zn", "O"], rattle=0.04, seed=9)],
                         ids=lambda s: s.composition.reduced_formula)
def test_ase_atoms_gives_same_graph(s):
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = AseAtomsAdaptor.get_atoms(s)
    g_pmg = fastchgnet.build_graph(s)
    g_ase = fastchgnet.build_graph(atoms)
    assert np.array_equal(g_pmg.atomic_numbers, g_ase.atomic_numbers)
    np.testing.assert_allclose(g_ase.positions, g_pmg.positions, rtol=0, atol=1e-12)
    np.testing.assert_allclose(g_ase.lattice, g_pmg.lattice, rtol=0, atol=1e-12)
    assert set(our_edge_keys(g_pmg)) == set(our_edge_keys(g_ase))
    assert set(our_angle_keys(g_pmg)) == set(our_angle_keys(g_ase))
    assert g_pmg.n_directed_bonds == g_ase.n_directed_bonds
    assert g_pmg.n_angles == g_ase.n_angles


def test_ase_atoms_matches_reference_graph(cif_structures):
    """ASE input of a CIF gives the reference converter's graph of the pymatgen structure."""
    from pymatgen.io.ase import AseAtomsAdaptor

    s = cif_structures["LiMnO2"]
    ref_edges, ref_angles = ref_graph_keys(s)
    g = fastchgnet.build_graph(AseAtomsAdaptor.get_atoms(s))
    assert set(our_edge_keys(g)) == set(ref_edges)
    assert set(our_angle_keys(g)) == set(ref_angles)


# ------------------------------------------------------------------------------------------------
# batching


def test_collate_offsets_and_split_by_size():
    structs = [make("diamond", ["Si"]), make("rocksalt", ["Na", "Cl"]), make("simple_cubic", ["Cu"])]
    graphs = fastchgnet.build_graphs(structs)
    b = fastchgnet.collate(graphs)
    assert b.num_graphs == 3
    assert b.num_atoms == sum(g.n_atoms for g in graphs)
    assert b.num_bonds == sum(g.n_bonds for g in graphs)
    assert b.num_angles == sum(g.n_angles for g in graphs)
    assert b.n_atoms.tolist() == [g.n_atoms for g in graphs]
    # every bond and angle stays inside its own structure
    ag = b.atom_graph
    assert (ag[b.bond_src] == b.bond_graph).all() and (ag[b.bond_dst] == b.bond_graph).all()
    assert (b.bond_graph[b.angle_bond1] == ag[b.angle_center]).all()
    assert (b.bond_graph[b.angle_bond2] == ag[b.angle_center]).all()

    from fastchgnet.data import split_by_size

    assert split_by_size(graphs, max_graphs=2) == [[0, 1], [2]]
    n = [g.n_atoms for g in graphs]
    groups = split_by_size(graphs, max_graphs=16, max_atoms=n[0] + n[1] - 1)
    assert groups[0] == [0] and sum(groups, []) == [0, 1, 2]
    with pytest.raises(ValueError):
        fastchgnet.collate([])
