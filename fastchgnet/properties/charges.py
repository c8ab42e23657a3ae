"""Atomic charges (formal oxidation states) read off the magnetic moments, as chgnet's
``chgnet.utils.vasp_utils.solve_charge_by_mag`` assigns them.

The rule (chgnet 0.4.2's defaults):

* an element with a table of magnetic-moment ranges (``ox_ranges``; default only Mn:
  ``[0.5, 1.5) -> +2``, ``[1.5, 2.5) -> +3``, ``[2.5, 3.5) -> +4``, ``[3.5, 4.2) -> +3``,
  ``[4.2, 5) -> +2``, magnitudes in μB) gets the state of the first range, in the table's order,
  with ``low <= m < high``;
* otherwise an element with a fixed state (``default_ox``; default Li +1, O -2) gets it;
* if any site gets no state (an element in neither table, or a moment outside every range), the
  structure is not solved: chgnet returns None (with a warning).

The magnetic moments are the ``final_magmom`` site property, else ``magmom``, else a prediction
of the model (CHGNet's magnitudes). The lookup is vectorised over sites (numpy); only the
elements present and their ranges are looped over.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import numpy as np

__all__ = ["DEFAULT_OX", "DEFAULT_OX_RANGES", "charges_from_magmoms", "oxidation_states"]

#: element -> {(lowest magmom, highest magmom): oxidation state}, μB (chgnet's default: Mn only)
DEFAULT_OX_RANGES: dict[str, dict[tuple[float, float], int]] = {
    "Mn": {(0.5, 1.5): 2, (1.5, 2.5): 3, (2.5, 3.5): 4, (3.5, 4.2): 3, (4.2, 5): 2},
}
#: fixed oxidation states of elements without a magmom rule (chgnet's default)
DEFAULT_OX: dict[str, float] = {"Li": 1, "O": -2}


def _as_structure(structure: Any) -> Any:
    if hasattr(structure, "lattice") and hasattr(structure, "sites"):
        return structure
    if hasattr(structure, "get_positions"):
        from pymatgen.io.ase import AseAtomsAdaptor

        return AseAtomsAdaptor.get_structure(structure)
    raise TypeError(f"expected a pymatgen Structure or an ASE Atoms, got {type(structure).__name__}")


def _magmoms(structure: Any, magmoms: Any, model: Any, device: Any) -> np.ndarray:
    n = len(structure)
    if magmoms is None:
        props = structure.site_properties
        magmoms = props.get("final_magmom", props.get("magmom"))
    if magmoms is None:
        from fastchgnet.md.calculator import resolve_model
        from fastchgnet.model.predict import predict

        net = resolve_model(model, device)
        magmoms = predict(net, structure, task="em")["m"]
    m = np.asarray(magmoms, dtype=np.float64)
    if m.ndim == 2 and m.shape[1] == 3:  # vector moments: their magnitudes
        m = np.linalg.norm(m, axis=1)
    if m.shape != (n,):
        raise ValueError(f"structure {structure.composition.formula.replace(' ', '')}: magmoms must "
                         f"have one value per site ({n}), got shape {m.shape}")
    return m


def oxidation_states(structure: Any, magmoms: Any = None, model: Any = "0.3.0", *,
                     default_ox: Mapping[str, float] | None = None,
                     ox_ranges: Mapping[str, Mapping[tuple[float, float], float]] | None = None,
                     device: Any = None) -> np.ndarray:
    """Per-site oxidation states (float array) by chgnet's rule; NaN where none applies.

    Arguments as in :func:`charges_from_magmoms`.
    """
    s = _as_structure(structure)
    m = _magmoms(s, magmoms, model, device)
    default_ox = DEFAULT_OX if default_ox is None else default_ox
    ox_ranges = DEFAULT_OX_RANGES if ox_ranges is None else ox_ranges
    # chgnet compares the species string of the site without oxidation states
    bare = s.copy()
    bare.remove_oxidation_states()
    kinds, inverse = np.unique(np.array([site.species_string for site in bare], dtype=str),
                               return_inverse=True)
    out = np.full(len(s), np.nan)
    for k, label in enumerate(kinds):  # the elements present, not the sites
        sites = inverse == k
        if label in ox_ranges:
            table = list(ox_ranges[label].items())
            if not table:
                continue
            lo = np.array([r[0][0] for r in table], dtype=np.float64)
            hi = np.array([r[0][1] for r in table], dtype=np.float64)
            ox = np.array([r[1] for r in table], dtype=np.float64)
            mm = m[sites][:, None]
            hit = (lo[None, :] <= mm) & (mm < hi[None, :])  # (sites, ranges)
            first = np.argmax(hit, axis=1)  # the first matching range, in the table's order
            out[sites] = np.where(hit.any(axis=1), ox[first], np.nan)
        elif label in default_ox:
            out[sites] = float(default_ox[label])
    return out


def charges_from_magmoms(structure: Any, magmoms: Any = None, model: Any = "0.3.0", *,
                         default_ox: Mapping[str, float] | None = None,
                         ox_ranges: Mapping[str, Mapping[tuple[float, float], float]] | None = None,
                         device: Any = None, as_array: bool = False) -> Any:
    """Oxidation states from magnetic moments (chgnet's ``solve_charge_by_mag``).

    Args:
        structure: a pymatgen ``Structure`` (or an ASE ``Atoms``, converted).
        magmoms: per-site magnetic moments (μB; magnitudes, or (n, 3) vectors whose norms are
            used). Default: the ``final_magmom`` or ``magmom`` site property, else the model's
            prediction.
        model: used only when no moments are given: ``"0.3.0"``, a checkpoint path or a model.
        default_ox: fixed states of elements without a magmom rule (default Li +1, O -2).
        ox_ranges: per element ``{(low, high): state}``; a moment ``low <= m < high`` gives
            ``state``, the first matching range in the dict's order (default: chgnet's Mn rule).
        device: for the model prediction.
        as_array: return the per-site states as a float array (NaN where unsolved) instead.

    Returns:
        As chgnet: a copy of the structure decorated with the oxidation states
        (``add_oxidation_state_by_site``), or None with a warning when some site cannot be
        assigned. With ``as_array``, the array.
    """
    s = _as_structure(structure)
    ox = oxidation_states(s, magmoms, model, default_ox=default_ox, ox_ranges=ox_ranges,
                          device=device)
    if as_array:
        return ox
    if np.isnan(ox).any():
        bad = int(np.flatnonzero(np.isnan(ox))[0])
        warnings.warn(f"Failed to solve oxidation state of {s.composition.formula.replace(' ', '')}:"
                      f" site {bad} ({s[bad].species_string}) matches no rule", stacklevel=2)
        return None
    out = s.copy()
    out.remove_oxidation_states()
    whole = bool(np.all(ox == np.round(ox)))
    out.add_oxidation_state_by_site(ox.astype(int).tolist() if whole else ox.tolist())
    return out
