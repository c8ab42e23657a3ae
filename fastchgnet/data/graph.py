"""Crystal graphs: atom graph (bonds within ``atom_cutoff``) and bond graph (angles).

The edge and angle sets are those of the reference CHGNet converter:

* atom graph: every directed pair ``(i, j, image)`` with ``|x_j + image @ L - x_i| <= atom_cutoff``
  over periodic images (pymatgen's ``find_points_in_spheres``), without the zero-image self pair.
  Directed pairs ``(i, j, n)`` and ``(j, i, -n)`` are the two directions of one *undirected* bond;
  bond features live on undirected bonds.
* bond graph: every ordered pair of distinct directed bonds that leave the same centre atom and are
  both shorter than ``bond_cutoff``. Each such pair is one *angle*.

Everything is built with numpy array operations: there is no Python loop over atoms, bonds or
angles. Only the undirected bonds are stored (a directed bond is an undirected bond and a sign).
"""

from __future__ import annotations

import functools

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np

# Smallest interatomic distance (Å) accepted by default. Closer atoms make the radial basis
# (sin(x)/x with x -> 0) and the angles ill-conditioned; real structures have none below 0.5 Å
# (the H2 bond is 0.74 Å).
DEFAULT_MIN_DISTANCE = 0.5
MAX_ATOMIC_NUMBER = 94  # the CHGNet 0.3.0 embedding covers H..Pu

OnIsolated = Literal["error", "warn", "ignore"]

# Bounds on what one structure may ask of a graph builder, checked before any neighbour search
# (see graph_size_problems). None of them is reached by a real crystal; each is reached by a cell
# that is flat, tiny or scaled in the wrong unit, which would otherwise run until the machine
# kills the process for memory.
#
# Periodic images of the cell that the neighbour search visits, the product over periodic axes of
# (2 ceil(r / h) + 1) for cell height h and cutoff r. The reduced cell of a real crystal has
# heights above ~1 Å (primitive fcc Cu and diamond: 2.1 Å): at most 13^3 = 2,197 images at
# r = 6 Å. A flat cell (height 1e-6 Å) needs ~1e7 along one axis.
MAX_IMAGES = 100_000
# Estimated memory of one graph build, bytes per atom (the limit is never below MIN_GRAPH_BYTES).
# Diamond, the densest common crystal (0.18 atoms/Å^3, ~160 bonds within 6 Å and ~240 angles
# per atom), needs ~60 kB per atom: the bound is 250 times that, reached at ~20 times diamond's
# density.
MAX_GRAPH_BYTES_PER_ATOM = 16 * 2**20
MIN_GRAPH_BYTES = 2**30
# Measured peak memory of build_graph (pymatgen's buffers included): ~100-150 bytes per directed
# bond and ~60-80 per angle (864-atom Li9Co7O16 supercell, and one compressed 0.6x).
BYTES_PER_BOND = 200
BYTES_PER_ANGLE = 80


@dataclass
class CrystalGraph:
    """One structure's crystal graph (numpy arrays, float64 geometry).

    Bonds are undirected: bond ``u`` goes from ``bond_src[u]`` to ``bond_dst[u]`` + image, and its
    vector is ``pos[src] - pos[dst] - image @ lattice`` (the reference's "centre minus neighbour").
    The directed bond ``src -> dst`` has sign +1, the reverse ``dst -> src`` sign -1.
    """

    atomic_numbers: np.ndarray  # (n_atoms,) int64
    positions: np.ndarray  # (n_atoms, 3) float64, Cartesian Å
    lattice: np.ndarray  # (3, 3) float64, rows are lattice vectors
    bond_src: np.ndarray  # (n_bonds,) int64, undirected bonds
    bond_dst: np.ndarray  # (n_bonds,) int64
    bond_image: np.ndarray  # (n_bonds, 3) int64
    bond_length: np.ndarray  # (n_bonds,) float64, at build time
    angle_center: np.ndarray  # (n_angles,) int64, centre atom of the angle
    angle_bond1: np.ndarray  # (n_angles,) int64, undirected bond of the first leg
    angle_bond2: np.ndarray  # (n_angles,) int64, undirected bond of the second leg
    angle_sign1: np.ndarray  # (n_angles,) int8, direction of leg 1 (+1: bond_src is the centre)
    angle_sign2: np.ndarray  # (n_angles,) int8
    atom_cutoff: float = 6.0
    bond_cutoff: float = 3.0
    graph_id: Any = None
    info: dict = field(default_factory=dict)

    @property
    def n_atoms(self) -> int:
        return int(self.atomic_numbers.shape[0])

    @property
    def n_bonds(self) -> int:
        """Undirected bonds (the reference's bond-feature rows)."""
        return int(self.bond_src.shape[0])

    @property
    def n_directed_bonds(self) -> int:
        return 2 * self.n_bonds

    @property
    def n_angles(self) -> int:
        return int(self.angle_center.shape[0])

    @property
    def volume(self) -> float:
        return float(abs(np.linalg.det(self.lattice)))

    def directed_bonds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(src, dst, image) of all directed bonds: the undirected ones, then their reverses."""
        src = np.concatenate([self.bond_src, self.bond_dst])
        dst = np.concatenate([self.bond_dst, self.bond_src])
        img = np.concatenate([self.bond_image, -self.bond_image])
        return src, dst, img

    def directed2undirected(self) -> np.ndarray:
        """Map from the directed bonds of :meth:`directed_bonds` to undirected bond rows."""
        return np.tile(np.arange(self.n_bonds, dtype=np.int64), 2)

    def __repr__(self) -> str:
        return (
            f"CrystalGraph(id={self.graph_id!r}, atoms={self.n_atoms}, "
            f"directed_bonds={self.n_directed_bonds}, angles={self.n_angles})"
        )


def _name(graph_id: Any, index: int | None) -> str:
    parts = []
    if index is not None:
        parts.append(f"structure {index}")
    if graph_id is not None:
        parts.append(f"id={graph_id!r}")
    return " ".join(parts) if parts else "structure"


def structure_arrays(structure: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(atomic_numbers, cart positions, lattice, pbc) of a pymatgen Structure or ASE Atoms.

    Raises ValueError for disordered sites or non-element species.
    """
    # ASE Atoms
    if hasattr(structure, "get_atomic_numbers") and hasattr(structure, "get_cell"):
        z = np.asarray(structure.get_atomic_numbers(), dtype=np.int64)
        pos = np.asarray(structure.get_positions(), dtype=np.float64)
        lat = np.asarray(structure.get_cell()[:], dtype=np.float64)
        pbc = np.asarray(structure.get_pbc(), dtype=bool)
        return z, pos, lat, pbc
    # pymatgen Structure
    if hasattr(structure, "lattice") and hasattr(structure, "sites"):
        if not getattr(structure, "is_ordered", True):
            raise ValueError("is disordered (partial occupancies); order it first")
        from pymatgen.core.periodic_table import DummySpecies

        species = structure.species
        for sp in set(species):  # distinct species only
            if isinstance(sp, DummySpecies) or not hasattr(sp, "Z"):
                raise ValueError(f"has a species that is not an element ({sp}) at site "
                                 f"{species.index(sp)}")
        z = np.asarray(structure.atomic_numbers, dtype=np.int64)
        pos = np.asarray(structure.cart_coords, dtype=np.float64).reshape(-1, 3)
        lat = np.asarray(structure.lattice.matrix, dtype=np.float64)
        pbc = np.asarray(getattr(structure.lattice, "pbc", (True, True, True)), dtype=bool)
        return z, pos, lat, pbc
    raise TypeError(f"expected a pymatgen Structure or an ASE Atoms, got {type(structure).__name__}")


def _check_inputs(z: np.ndarray, pos: np.ndarray, lat: np.ndarray, max_z: int) -> None:
    if z.shape[0] == 0:
        raise ValueError("is empty (no atoms)")
    bad = (z < 1) | (z > max_z)
    if bad.any():
        idx = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"has an element the model does not know: atomic number {int(z[idx])} at site {idx} "
            f"(the model covers Z = 1..{max_z})"
        )
    if not np.isfinite(pos).all():
        idx = int(np.flatnonzero(~np.isfinite(pos).all(axis=1))[0])
        raise ValueError(f"has a non-finite (NaN/inf) coordinate at site {idx}")
    if not np.isfinite(lat).all():
        raise ValueError("has a non-finite (NaN/inf) lattice")
    vol = abs(float(np.linalg.det(lat)))
    scale = float(np.prod(np.linalg.norm(lat, axis=1)))
    if not vol > 1e-8 * max(scale, 1e-300) or vol < 1e-6:
        raise ValueError(f"has a singular lattice (volume {vol:.3g} Å^3)")


def cell_heights(lattice: np.ndarray) -> tuple[float, np.ndarray]:
    """(volume, heights): the cell volume (Å^3) and its three heights (Å), the distances between
    opposite faces (``h_a`` is the spacing of the lattice planes spanned by b and c)."""
    lat = np.asarray(lattice, dtype=np.float64)
    a, b = lat[[1, 2, 0]], lat[[2, 0, 1]]  # rows b x c, c x a, a x b (np.cross is slow on 3x3)
    cross = a[:, [1, 2, 0]] * b[:, [2, 0, 1]] - a[:, [2, 0, 1]] * b[:, [1, 2, 0]]
    vol = abs(float(np.dot(lat[0], cross[0])))
    return vol, vol / np.maximum(np.linalg.norm(cross, axis=1), 1e-300)


def _fmt3(h: Sequence[float]) -> str:
    return ", ".join(f"{float(x):.3g}" for x in h)


def graph_size_problems(
    n_atoms: Any,
    volume: Any,
    heights: Any,
    pbc: Any,
    spread: Any = None,
    *,
    atom_cutoff: float = 6.0,
    bond_cutoff: float = 3.0,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    n_images: Any = None,
) -> list[tuple[int, str]]:
    """Cells too small, flat or dense to build a graph of: ``[(index, problem), ...]``.

    Vectorised over structures (arrays of shape (G,) and (G, 3)); used by :func:`build_graph`
    and by the device graph builder before any neighbour search. Three rules, in this order:

    1. **Density** (when ``min_distance > 0``): disjoint balls of diameter ``d = min_distance``
       around the atoms fit in the cell, so ``n_atoms / V <= 6 / (pi d^3)`` (15.3 atoms/Å^3 for
       0.5 Å; diamond has 0.18). A denser cell must have atoms closer than ``d``: this is exact,
       not an estimate. Along a non-periodic axis the atoms' extent plus ``d`` replaces the cell.
    2. **Images**: the neighbour search visits ``prod_k (2 ceil(r / h_k) + 1)`` periodic images
       (``n_images`` overrides the count); more than :data:`MAX_IMAGES` means a flat or tiny cell,
       or a lattice basis far from reduced.
    3. **Memory**: ``n_atoms^2 (4/3) pi r^3 / V`` directed bonds within ``atom_cutoff`` and
       ``n_atoms k^2`` angles (``k`` short bonds per atom, from the same density estimate), at
       :data:`BYTES_PER_BOND` and :data:`BYTES_PER_ANGLE`, must stay below
       :data:`MAX_GRAPH_BYTES_PER_ATOM` per atom (and never below :data:`MIN_GRAPH_BYTES`).
       Along a non-periodic axis the atoms' extent, at least 4/3 of the cutoff, replaces the cell.

    Args:
        n_atoms, volume, heights: the cells (see :func:`cell_heights`); a volume that is not
            positive and finite is a singular lattice.
        pbc: periodic axes, (G, 3) or (3,).
        spread: extent of the atoms' fractional coordinates per axis (read for non-periodic axes).
    """
    n = np.atleast_1d(np.asarray(n_atoms, dtype=np.float64))
    g = n.shape[0]
    vol = np.broadcast_to(np.asarray(volume, dtype=np.float64), (g,))
    h = np.broadcast_to(np.asarray(heights, dtype=np.float64), (g, 3))
    per = np.broadcast_to(np.asarray(pbc, dtype=bool), (g, 3))
    f = np.zeros((g, 3)) if spread is None else np.broadcast_to(np.asarray(spread, np.float64), (g, 3))
    d, r, rb = float(min_distance), float(atom_cutoff), min(float(bond_cutoff), float(atom_cutoff))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        singular = ~(np.isfinite(vol) & (vol > 1e-6) & np.isfinite(h).all(1) & (h > 0).all(1))
        hs = np.where(singular[:, None], 1.0, h)
        vs = np.where(singular, 1.0, vol)
        # 1. density, exact
        rho_max = 6.0 / (np.pi * d**3) if d > 0 else np.inf
        w_pack = vs * np.prod(np.where(per, 1.0, f + d / hs), axis=1)
        dense = n / w_pack > rho_max * (1 + 1e-9)
        # 2. periodic images within the cutoff
        per_axis = np.where(per, 2.0 * np.ceil(r / hs) + 1.0, 1.0)
        images = (np.prod(per_axis, axis=1) if n_images is None
                  else np.broadcast_to(np.asarray(n_images, dtype=np.float64), (g,)))
        many = images > MAX_IMAGES
        # 3. memory, estimated from the density
        w_nbr = vs * np.prod(np.where(per, 1.0, np.maximum(f, 4.0 * r / (3.0 * hs))), axis=1)
        bonds = n * np.minimum(n / w_nbr * 4.0 / 3.0 * np.pi * r**3, n * images)
        short = np.minimum(n / w_nbr * 4.0 / 3.0 * np.pi * rb**3, n * images)
        angles = n * short * short
        need = bonds * BYTES_PER_BOND + angles * BYTES_PER_ANGLE
        limit = np.maximum(MIN_GRAPH_BYTES, MAX_GRAPH_BYTES_PER_ATOM * n)
        big = need > limit
    out: list[tuple[int, str]] = []
    for i in np.flatnonzero(singular | dense | many | big):
        i = int(i)
        if singular[i]:
            out.append((i, f"has a singular lattice (volume {vol[i]:.3g} Å^3)"))
            continue
        cell = f"cell heights {_fmt3(h[i])} Å along a, b, c"
        flat = None
        if per[i].any():  # flat: one height far below the largest and below an atomic distance
            k = int(np.argmin(np.where(per[i], h[i], np.inf)))
            if h[i, k] < max(d, 0.5) and h[i, k] < 0.1 * float(h[i].max()):
                flat = f"cell height {h[i, k]:.3g} Å along {'abc'[k]}"
        ni = int(n[i])
        if dense[i]:
            lead = (f"has {flat} (a flat cell; {cell})" if flat
                    else f"has a cell of {vol[i]:.3g} Å^3 ({cell})")
            msg = (f"{lead}: {ni} atoms in {w_pack[i]:.3g} Å^3 are {n[i] / w_pack[i]:.3g} "
                   f"atoms/Å^3, more than atoms at least {d:g} Å apart can fill "
                   f"({rho_max:.3g}/Å^3), so some are closer than {d:g} Å. The cell is flat or too "
                   f"small (a lattice in the wrong unit, or scaled down?)")
        elif many[i]:
            k = int(np.argmax(per_axis[i]))
            msg = (f"has cell height {h[i, k]:.3g} Å along {'abc'[k]} ({cell}): the {r:g} Å cutoff "
                   f"reaches {per_axis[i, k]:.3g} periodic images along {'abc'[k]} "
                   f"({images[i]:.3g} in all, more than the {MAX_IMAGES:,} allowed). The cell is "
                   f"flat or tiny, or its lattice vectors are far from reduced (reduce it, e.g. "
                   f"Structure.get_reduced_structure())")
        else:
            lead = f"has {flat} ({cell}) and" if flat else "has"
            msg = (f"{lead} ≈ {bonds[i]:.3g} bonds within {r:g} Å ({bonds[i] / n[i]:.3g} per atom) "
                   f"and ≈ {angles[i]:.3g} angles, which would need ≈ {need[i] / 1e9:.3g} GB to "
                   f"build, more than the {limit[i] / 1e9:.3g} GB allowed for {ni} "
                   f"atom{'s' if ni != 1 else ''} ({MAX_GRAPH_BYTES_PER_ATOM // 2**20} MiB per "
                   f"atom). The cell ({vol[i]:.3g} Å^3) is too small or flat for its atoms")
        out.append((i, msg))
    return out


def _formula(z: np.ndarray) -> str:
    """Element counts in order of first appearance, e.g. ``Li9Co7O16``."""
    from pymatgen.core.periodic_table import Element

    uniq, first, counts = np.unique(z, return_index=True, return_counts=True)
    order = np.argsort(first)
    return "".join(f"{Element.from_Z(int(uniq[i])).symbol}{int(counts[i]) if counts[i] > 1 else ''}"
                   for i in order)


# A periodic cell with at most SAFE_DENSITY atoms/Å^3 (diamond: 0.18) and every height at least
# SAFE_HEIGHT passes every bound of graph_size_problems whenever the worst cell of that envelope
# does (each bound grows with the density and with 1/height): the common case then costs no more
# than the cell heights.
SAFE_DENSITY = 0.5
SAFE_HEIGHT = 1.0


@functools.lru_cache(maxsize=16)
def _safe_envelope(atom_cutoff: float, bond_cutoff: float, min_distance: float) -> bool:
    """Whether the worst cell of the (SAFE_DENSITY, SAFE_HEIGHT) envelope passes every bound,
    for these cutoffs (evaluated with many atoms, so that only the per-atom bounds count)."""
    n = 1e6
    return not graph_size_problems(n, n / SAFE_DENSITY, (SAFE_HEIGHT,) * 3, (True, True, True),
                                   atom_cutoff=atom_cutoff, bond_cutoff=bond_cutoff,
                                   min_distance=min_distance)


def check_graph_size(z: np.ndarray, pos: np.ndarray, lat: np.ndarray, pbc: np.ndarray, *,
                     atom_cutoff: float, bond_cutoff: float, min_distance: float) -> np.ndarray:
    """Raise ValueError (naming the formula and the problem) for a cell too small, flat or dense
    to build a graph of (:func:`graph_size_problems`); return the fractional coordinates."""
    vol, heights = cell_heights(lat)
    frac = np.linalg.solve(lat.T, pos.T).T
    n = z.shape[0]
    if (pbc.all() and n <= SAFE_DENSITY * vol and float(heights.min()) >= SAFE_HEIGHT
            and _safe_envelope(atom_cutoff, bond_cutoff, min_distance)):
        return frac  # within the envelope every bound holds: skip the full check (hot path)
    spread = np.ptp(frac, axis=0) if frac.shape[0] else np.zeros(3)
    problems = graph_size_problems(z.shape[0], vol, heights, pbc, spread, atom_cutoff=atom_cutoff,
                                   bond_cutoff=bond_cutoff, min_distance=min_distance)
    if problems:
        raise ValueError(f"({_formula(z)}) {problems[0][1]}")
    return frac


def build_graph(
    structure: Any,
    *,
    atom_cutoff: float = 6.0,
    bond_cutoff: float = 3.0,
    graph_id: Any = None,
    index: int | None = None,
    on_isolated_atoms: OnIsolated = "error",
    min_distance: float = DEFAULT_MIN_DISTANCE,
    max_atomic_number: int = MAX_ATOMIC_NUMBER,
) -> CrystalGraph:
    """Build the crystal graph of a pymatgen ``Structure`` or ASE ``Atoms``.

    Args:
        structure: the input structure (periodic; non-periodic ASE axes are honoured).
        atom_cutoff: atom-graph radius (Å), 6 for CHGNet 0.3.0.
        bond_cutoff: bond-graph radius (Å), 3 for CHGNet 0.3.0.
        graph_id: an id carried into error messages and the graph.
        index: the position of the structure in a list, for error messages.
        on_isolated_atoms: what to do with an atom that has no neighbour within ``atom_cutoff``:
            ``"error"`` raises ValueError, ``"warn"`` warns, ``"ignore"`` keeps it silently (its
            energy then comes from its embedding alone, as in the reference).
        min_distance: atoms closer than this (Å) raise ValueError.
        max_atomic_number: largest atomic number the model embeds.

    Before the neighbour search, the cell's size is checked against the bounds of
    :func:`graph_size_problems`, so that a flat, tiny or wrongly scaled cell raises at once
    instead of exhausting memory:

    * more atoms per volume than atoms ``min_distance`` apart can fill (6 / (pi d^3): 15.3
      atoms/Å^3 for 0.5 Å; diamond has 0.18) — exact, e.g. a cell scaled by 0.01;
    * more than :data:`MAX_IMAGES` (100,000) periodic images within ``atom_cutoff`` (a reduced
      cell needs at most ~2,200 at 6 Å), e.g. a cell height of 1e-6 Å;
    * an estimated build memory above :data:`MAX_GRAPH_BYTES_PER_ATOM` (16 MiB) per atom and
      1 GiB in all (real crystals need < 0.1 MiB per atom), e.g. a tiny cell with
      ``min_distance=0``.

    The message names the structure, its formula, the cell heights and the estimate.

    Raises:
        ValueError naming the structure (index and/or id) and the problem.
    """
    from pymatgen.optimization.neighbors import find_points_in_spheres

    if on_isolated_atoms not in ("error", "warn", "ignore"):
        raise ValueError(f"on_isolated_atoms must be 'error', 'warn' or 'ignore', got {on_isolated_atoms!r}")
    who = _name(graph_id, index)
    try:
        z, pos, lat, pbc = structure_arrays(structure)
        _check_inputs(z, pos, lat, max_atomic_number)
        frac = check_graph_size(z, pos, lat, pbc, atom_cutoff=atom_cutoff, bond_cutoff=bond_cutoff,
                                min_distance=min_distance)
    except ValueError as exc:
        raise ValueError(f"{who} {exc}") from None
    n_atoms = z.shape[0]
    pos = np.ascontiguousarray(pos)
    lat = np.ascontiguousarray(lat)
    # pymatgen keeps every image of every atom inside the bounding box of the centres (+ cutoff):
    # atoms many cells away (unwrapped MD coordinates) would blow that box up. Search with those
    # atoms wrapped into the cell, then give the images back relative to the given positions.
    far = np.asarray(pbc, dtype=bool) & ((frac < -2.0) | (frac >= 3.0))
    shift = np.where(far, np.floor(frac), 0.0)
    search_pos = pos - shift @ lat if far.any() else pos

    src, dst, img, dist = find_points_in_spheres(
        np.ascontiguousarray(search_pos), np.ascontiguousarray(search_pos), r=float(atom_cutoff),
        pbc=np.ascontiguousarray(pbc, dtype=np.int64), lattice=lat, tol=1e-8,
    )
    img = np.rint(img).astype(np.int64)
    if far.any():  # x_j - s_j L + n L - (x_i - s_i L) = x_j + (n + s_i - s_j) L - x_i
        s = shift.astype(np.int64)
        img = img + s[src] - s[dst]
    not_self = ~((src == dst) & (dist <= 1e-8))
    if not not_self.all():
        # a zero-distance pair of *different* atoms is caught by the min-distance check below
        src, dst, img, dist = src[not_self], dst[not_self], img[not_self], dist[not_self]
    if dist.size and float(dist.min()) < min_distance:
        k = int(np.argmin(dist))
        raise ValueError(
            f"{who} has atoms {int(src[k])} and {int(dst[k])} only {float(dist[k]):.4f} Å apart "
            f"(minimum allowed {min_distance} Å)"
        )

    # --- undirected bonds: (i, j, n) and (j, i, -n) pair up; keep the canonical direction ----
    # canonical: i < j, or i == j with the image lexicographically positive
    first_nz = np.where(img[:, 0] != 0, img[:, 0], np.where(img[:, 1] != 0, img[:, 1], img[:, 2]))
    canon = (src < dst) | ((src == dst) & (first_nz > 0))
    keys, rev_keys = _edge_keys(src, dst, img, n_atoms)
    canon_idx = np.flatnonzero(canon)
    order = np.argsort(keys[canon_idx], kind="stable")
    sorted_keys = keys[canon_idx][order]
    # every directed bond looks up its undirected row: itself if canonical, else its reverse;
    # the row of a canonical bond is its rank in pymatgen's order
    lookup = np.where(canon, keys, rev_keys)
    und = np.full(src.shape[0], -1, dtype=np.int64)
    if sorted_keys.size:
        p = np.minimum(np.searchsorted(sorted_keys, lookup), sorted_keys.size - 1)
        hit = sorted_keys[p] == lookup
        und[hit] = order[p[hit]]
    # A bond whose reverse is missing (rounding exactly at the cutoff) has a zero envelope and
    # would break the pairing: drop it.
    n_rev = np.bincount(und[(und >= 0) & ~canon], minlength=canon_idx.size)
    keep_canon = n_rev == 1
    if not keep_canon.all():
        remap = np.full(canon_idx.size, -1, dtype=np.int64)
        remap[keep_canon] = np.arange(int(keep_canon.sum()))
        und = np.where(und >= 0, remap[np.maximum(und, 0)], -1)
        canon_idx = canon_idx[keep_canon]

    bond_src = src[canon_idx]
    bond_dst = dst[canon_idx]
    bond_image = img[canon_idx]
    bond_length = dist[canon_idx]

    isolated = np.ones(n_atoms, dtype=bool)
    isolated[bond_src] = False
    isolated[bond_dst] = False
    if isolated.any():
        msg = (
            f"{who} has {int(isolated.sum())} isolated atom(s) (no neighbour within "
            f"{atom_cutoff} Å), e.g. site {int(np.flatnonzero(isolated)[0])}"
        )
        if on_isolated_atoms == "error":
            raise ValueError(msg)
        if on_isolated_atoms == "warn":
            import warnings

            warnings.warn(msg, stacklevel=2)

    # --- bond graph: ordered pairs of distinct short directed bonds leaving the same atom ------
    short = (dist < bond_cutoff) & (und >= 0)
    s_idx = np.flatnonzero(short)
    s_center = src[s_idx]
    order = np.argsort(s_center, kind="stable")
    s_idx, s_center = s_idx[order], s_center[order]
    counts = np.bincount(s_center, minlength=n_atoms)
    starts = np.cumsum(counts) - counts
    k = counts[s_center]  # group size of each short bond's centre
    n_pairs = int(k.sum())  # = sum over centres of (group size)^2
    first = np.repeat(np.arange(s_idx.size), k)
    offs = np.repeat(np.cumsum(k) - k, k)
    second = starts[s_center[first]] + (np.arange(n_pairs) - offs)
    keep = first != second
    first, second = first[keep], second[keep]
    d1, d2 = s_idx[first], s_idx[second]
    sign = np.where(canon, 1, -1).astype(np.int8)

    return CrystalGraph(
        atomic_numbers=z,
        positions=pos,
        lattice=lat,
        bond_src=bond_src.astype(np.int64),
        bond_dst=bond_dst.astype(np.int64),
        bond_image=bond_image,
        bond_length=bond_length,
        angle_center=src[d1].astype(np.int64),
        angle_bond1=und[d1].astype(np.int64),
        angle_bond2=und[d2].astype(np.int64),
        angle_sign1=sign[d1],
        angle_sign2=sign[d2],
        atom_cutoff=float(atom_cutoff),
        bond_cutoff=float(bond_cutoff),
        graph_id=graph_id,
    )


def _edge_keys(
    src: np.ndarray, dst: np.ndarray, img: np.ndarray, n_atoms: int
) -> tuple[np.ndarray, np.ndarray]:
    """Integer keys of the directed bonds (src, dst, image) and of their reverses (dst, src, -image).

    Equal keys mean equal bonds. A packed int64 when it cannot overflow, else ranks from np.unique.
    """
    reach = int(np.abs(img).max()) if img.size else 0
    base = 2 * reach + 1
    if float(max(n_atoms, 1)) ** 2 * float(base) ** 3 < 2**62:

        def pack(a: np.ndarray, b: np.ndarray, i: np.ndarray) -> np.ndarray:
            i = i + reach
            return ((a * n_atoms + b) * base + i[:, 0]) * base * base + i[:, 1] * base + i[:, 2]

        return pack(src, dst, img), pack(dst, src, -img)
    rows = np.concatenate([np.column_stack([src, dst, img]), np.column_stack([dst, src, -img])])
    _, inv = np.unique(rows, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    return inv[: src.shape[0]], inv[src.shape[0] :]


def build_graphs(
    structures: Sequence[Any],
    *,
    ids: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[CrystalGraph]:
    """Build graphs for many structures. Every bad structure is reported in one ValueError.

    The error names each bad structure (index and id) and its problem; the good structures are
    not dropped silently — the call fails as a whole so nothing is lost or replaced.
    """
    graphs: list[CrystalGraph] = []
    problems: list[str] = []
    for i, s in enumerate(structures):
        gid = ids[i] if ids is not None else None
        try:
            graphs.append(build_graph(s, graph_id=gid, index=i, **kwargs))
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        n = len(problems)
        head = f"{n} of {len(structures)} structures cannot be converted to graphs:\n  "
        raise ValueError(head + "\n  ".join(problems))
    return graphs
