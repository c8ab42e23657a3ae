"""Samples from in-memory pymatgen structures and labels."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

from fastchgnet.data.readers.common import BadEntry, Sample, _guarded, make_sample

def samples_from_structures(
    structures: Sequence[Any],
    energies: Sequence[float],
    forces: Sequence[Any] | None = None,
    stresses: Sequence[Any] | None = None,
    magmoms: Sequence[Any] | None = None,
    ids: Sequence[str] | None = None,
    *,
    energy_is_total: bool = False,
    source: str = "<memory>",
    skip_bad: bool = False,
    stats: dict | None = None,
) -> list[Sample]:
    """Samples from in-memory pymatgen structures and labels.

    ``energies`` are eV/atom (eV when ``energy_is_total``), ``forces`` (n, 3) eV/Å, ``stresses``
    (3, 3) GPa with CHGNet's sign (positive = tensile), ``magmoms`` (n,) μB. Any label list may be
    None, and any element of a label list may be None (missing). Ids default to the list index.
    """
    n = len(structures)
    for what, seq in (("energies", energies), ("forces", forces), ("stresses", stresses),
                      ("magmoms", magmoms), ("ids", ids)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{what} has {len(seq)} entries for {n} structures")

    def at(seq: Sequence[Any] | None, i: int) -> Any:
        return None if seq is None else seq[i]

    def entries() -> Iterator[tuple[str, Callable[[], Sample]]]:
        for i, s in enumerate(structures):
            sid = str(ids[i]) if ids is not None else str(i)

            def build(i: int = i, s: Any = s, sid: str = sid) -> Sample:
                if not (hasattr(s, "lattice") and hasattr(s, "sites")):
                    raise BadEntry("bad structure", f"expected a pymatgen Structure, got "
                                   f"{type(s).__name__}")
                e = energies[i]
                return make_sample(
                    s, energy_per_atom=None if energy_is_total else e,
                    energy_total=e if energy_is_total else None, forces=at(forces, i),
                    stress_gpa=at(stresses, i), magmom=at(magmoms, i), id=sid, source=source,
                )

            yield sid, build

    return list(_guarded(source, entries(), skip_bad, stats))


__all__ = ["samples_from_structures"]
