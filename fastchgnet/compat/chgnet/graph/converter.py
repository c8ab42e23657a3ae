"""chgnet's ``CrystalGraphConverter`` on fastchgnet's vectorised graph builder."""

from __future__ import annotations

from typing import Any

from fastchgnet.data.graph import CrystalGraph, build_graph

__all__ = ["CrystalGraphConverter"]

RESPONSES = ("ignore", "warn", "error")


class CrystalGraphConverter:
    """Structure -> crystal graph, called as chgnet's converter is: ``converter(structure,
    graph_id=None, mp_id=None)``.

    The graph is fastchgnet's :class:`~fastchgnet.data.CrystalGraph` (numpy arrays; the same
    atom and bond graphs as chgnet's). ``algorithm`` is accepted for chgnet's signature; there is
    one builder.
    """

    def __init__(self, *, atom_graph_cutoff: float = 6, bond_graph_cutoff: float = 3,
                 algorithm: str = "fast", on_isolated_atoms: str = "error",
                 verbose: bool = False) -> None:
        if algorithm not in ("legacy", "fast"):
            raise ValueError(f"algorithm must be 'legacy' or 'fast', got {algorithm!r}")
        self.atom_graph_cutoff = float(atom_graph_cutoff)
        self.bond_graph_cutoff = float(atom_graph_cutoff if bond_graph_cutoff is None
                                       else bond_graph_cutoff)
        self.algorithm = algorithm
        self.set_isolated_atom_response(on_isolated_atoms)
        self.verbose = verbose

    def set_isolated_atom_response(self, on_isolated_atoms: str) -> None:
        """``"ignore"``, ``"warn"`` or ``"error"`` for atoms without a neighbour in the cutoff."""
        if on_isolated_atoms not in RESPONSES:
            raise ValueError(f"on_isolated_atoms must be one of {RESPONSES}, got "
                             f"{on_isolated_atoms!r}")
        self.on_isolated_atoms = on_isolated_atoms

    def __call__(self, structure: Any, graph_id: Any = None, mp_id: Any = None) -> CrystalGraph:
        graph = build_graph(structure, atom_cutoff=self.atom_graph_cutoff,
                            bond_cutoff=self.bond_graph_cutoff,
                            graph_id=graph_id if graph_id is not None else mp_id,
                            on_isolated_atoms=self.on_isolated_atoms)
        if mp_id is not None:
            graph.info["mp_id"] = mp_id
        return graph

    forward = __call__

    def __repr__(self) -> str:
        return (f"CrystalGraphConverter(algorithm={self.algorithm!r}, atom_graph_cutoff="
                f"{self.atom_graph_cutoff}, bond_graph_cutoff={self.bond_graph_cutoff})")
