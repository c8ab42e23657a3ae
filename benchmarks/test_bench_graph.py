"""Crystal-graph construction, fastchgnet vs the reference ``CrystalGraphConverter``.

Cases: the 864-atom Li9Co7O16 3x3x3 supercell (the key case; an 800+ atom built-in supercell when
the shared CIFs are absent) and the LiMnO2 (8 atoms) and Li9Co7O16 (32 atoms) unit cells. Both
implementations start from a pymatgen ``Structure`` and build the 6 Å atom graph and the 3 Å bond
graph (angles). ``extra_info``: atoms, bonds, directed bonds, angles, device, ratio.
"""

from __future__ import annotations

import pytest

import fastchgnet

IMPLS = ("chgnet", "ours")
CASES = ("supercell", "small", "medium")
# rounds per implementation, chosen so that the whole file takes ~10 s on 2 idle cores
ROUNDS = {("supercell", "ours"): 10, ("supercell", "chgnet"): 3,
          ("small", "ours"): 30, ("small", "chgnet"): 10,
          ("medium", "ours"): 30, ("medium", "chgnet"): 10}


def _structure(structures, case: str):
    return {"supercell": structures.large, "small": structures.small, "medium": structures.medium}[case]


# impl varies fastest: the two implementations of a case run one after the other
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_graph(benchmark, request, ratio_book, structures, device, case: str, impl: str) -> None:
    s = _structure(structures, case)
    ours_graph = fastchgnet.build_graph(s)
    if impl == "ours":
        fn = lambda: fastchgnet.build_graph(s)  # noqa: E731
    else:
        conv = request.getfixturevalue("ref_converter")
        fn = lambda: conv(s)  # noqa: E731
        ref_graph = fn()
        # both implementations must build the same graph, or the timing means nothing
        assert int(ref_graph.atom_graph.shape[0]) == ours_graph.n_directed_bonds
        assert int(ref_graph.bond_graph.shape[0]) == ours_graph.n_angles

    label = {"supercell": structures.names[2], "small": structures.names[0],
             "medium": structures.names[1]}[case]
    benchmark.group = f"graph {label}"
    benchmark.extra_info.update(
        case=case, structure=label, structures_from=structures.source, device="cpu (host code)",
        atoms=ours_graph.n_atoms, bonds=ours_graph.n_bonds,
        directed_bonds=ours_graph.n_directed_bonds, angles=ours_graph.n_angles,
    )
    benchmark.pedantic(fn, rounds=ROUNDS[(case, impl)], warmup_rounds=1, iterations=1)
    ratio_book.record(benchmark, impl)
