"""chgnet's ``chgnet.utils.vasp_utils.solve_charge_by_mag``: oxidation states from magnetic moments.

(chgnet's ``parse_vasp_dir`` is not mirrored: fastchgnet reads training data with
``fastchgnet.data.readers``.)
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["solve_charge_by_mag"]

# element -> {(lowest magmom, highest magmom): oxidation state}, the magnitude in μB
DEFAULT_OX_RANGES: dict[str, dict[tuple[float, float], int]] = {
    "Mn": {(0.5, 1.5): 2, (1.5, 2.5): 3, (2.5, 3.5): 4, (3.5, 4.2): 3, (4.2, 5): 2},
}
DEFAULT_OX: dict[str, float] = {"Li": 1, "O": -2}


def solve_charge_by_mag(structure: Any, default_ox: dict[str, float] | None = None,
                        ox_ranges: dict[str, dict[tuple[float, float], int]] | None = None) -> Any:
    """A copy of ``structure`` decorated with oxidation states read off its magnetic moments.

    Args:
        structure: a pymatgen ``Structure`` with a ``final_magmom`` or ``magmom`` site property
            (e.g. ``StructOptimizer.relax(...)["final_structure"]``).
        default_ox: fixed oxidation states of elements without a magmom rule (default Li +1,
            O -2).
        ox_ranges: per element, ``{(low, high): state}``: a site whose magmom m satisfies
            ``low <= m < high`` gets ``state`` (default: chgnet's rule for Mn: 0.5-1.5 μB -> +2,
            1.5-2.5 -> +3, 2.5-3.5 -> +4, 3.5-4.2 -> +3, 4.2-5 -> +2).

    Returns:
        The decorated ``Structure`` (printing the total charge, as chgnet does), or None with a
        warning when some site's state could not be assigned.
    """
    default_ox = default_ox or DEFAULT_OX
    ox_ranges = ox_ranges or DEFAULT_OX_RANGES
    props = structure.site_properties
    magmoms = props.get("final_magmom", props.get("magmom"))
    out = structure.copy()
    out.remove_oxidation_states()
    states: list[float] = []
    for i, site in enumerate(out):
        element = site.species_string
        state = None
        if element in ox_ranges:
            m = float(magmoms[i]) if magmoms is not None else float("nan")
            state = next((ox for (lo, hi), ox in ox_ranges[element].items() if lo <= m < hi), None)
        elif element in default_ox:
            state = default_ox[element]
        if state is None:
            warnings.warn("Failed to solve oxidation state", stacklevel=2)
            return None
        states.append(state)
    total_charge = sum(states)
    print(f"Solved oxidation state, {total_charge=}")
    out.add_oxidation_state_by_site(states)
    return out
