"""Built-in crystal prototypes: varied, physically sensible structures made in code.

Used by the demo, the tests and the benchmarks (no data files needed). Each prototype is scaled so
that its shortest interatomic distance is the sum of the two atoms' radii, then optionally strained,
rattled and repeated into a supercell.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from pymatgen.core import Element, Lattice, Structure

# ≥ 60 elements across the periodic table (all within CHGNet's Z = 1..94)
ELEMENT_POOL: tuple[str, ...] = (
    "Li", "Be", "B", "C", "N", "O", "F", "Na", "Mg", "Al", "Si", "P", "S", "Cl", "K", "Ca",
    "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga", "Ge", "As", "Se", "Br",
    "Rb", "Sr", "Y", "Zr", "Nb", "Mo", "Ru", "Rh", "Pd", "Ag", "Cd", "In", "Sn", "Sb", "Te",
    "I", "Cs", "Ba", "La", "Ce", "Nd", "Gd", "Hf", "Ta", "W", "Re", "Ir", "Pt", "Au", "Hg",
    "Tl", "Pb", "Bi", "H", "U",
)
CATIONS = ("Li", "Na", "K", "Mg", "Ca", "Sr", "Ba", "Al", "Ga", "In", "Sc", "Y", "La", "Ti",
           "Zr", "Hf", "V", "Nb", "Ta", "Cr", "Mo", "W", "Mn", "Fe", "Co", "Ni", "Cu", "Zn",
           "Cd", "Sn", "Pb", "Bi", "Ce", "Nd", "Gd", "Rb", "Cs", "Ag", "Tl", "U")
ANIONS = ("O", "S", "Se", "Te", "F", "Cl", "Br", "I", "N", "P", "As", "Sb", "C", "B", "H")
METALS = ("Li", "Na", "K", "Mg", "Ca", "Al", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu",
          "Zn", "Zr", "Nb", "Mo", "Ru", "Rh", "Pd", "Ag", "Hf", "Ta", "W", "Re", "Ir", "Pt",
          "Au", "Pb", "Sn", "Be", "Y", "Sc", "Cd", "Hg")


def _radius(el: str) -> float:
    e = Element(el)
    r = e.atomic_radius or e.atomic_radius_calculated or 1.5
    return float(r)


def _scaled(s: Structure) -> Structure:
    """Scale the lattice so that no pair is closer than the sum of its two atomic radii.

    The tightest pair (smallest distance / radius sum) ends at exactly its radius sum; this puts
    common crystals within a few percent of their experimental volumes (Si, NaCl, MgO, GaN, TiO2).
    """
    src, dst, _, d = s.get_neighbor_list(r=8.0)  # includes periodic self-images
    if len(d) == 0:
        return s
    radii = np.array([_radius(sp.symbol) for sp in s.species])
    ratio = float(np.min(d / (radii[src] + radii[dst])))
    s = s.copy()
    s.scale_lattice(s.volume / ratio**3)
    return s


def rocksalt(a: str, b: str) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.0), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])


def cscl(a: str, b: str) -> Structure:
    return Structure(Lattice.cubic(3.5), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])


def zincblende(a: str, b: str) -> Structure:
    return Structure.from_spacegroup("F-43m", Lattice.cubic(5.5), [a, b], [[0, 0, 0], [0.25, 0.25, 0.25]])


def fluorite(a: str, b: str) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.5), [a, b], [[0, 0, 0], [0.25, 0.25, 0.25]])


def perovskite(a: str, b: str, x: str) -> Structure:
    return Structure(Lattice.cubic(3.9), [a, b, x, x, x],
                     [[0.5, 0.5, 0.5], [0, 0, 0], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]])


def rutile(a: str, b: str) -> Structure:
    return Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.6, 3.0), [a, b],
                                     [[0, 0, 0], [0.305, 0.305, 0]])


def wurtzite(a: str, b: str) -> Structure:
    return Structure.from_spacegroup("P6_3mc", Lattice.hexagonal(3.2, 5.2), [a, b],
                                     [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.375]])


def layered(a: str, b: str, x: str) -> Structure:
    """alpha-NaFeO2 / LiCoO2 type (R-3m)."""
    return Structure.from_spacegroup("R-3m", Lattice.hexagonal(2.85, 14.1), [a, b, x],
                                     [[0, 0, 0.5], [0, 0, 0], [0, 0, 0.26]])


def l12(a: str, b: str) -> Structure:
    """Cu3Au type: A on the cube corner, B on the face centres."""
    return Structure(Lattice.cubic(3.8), [a, b, b, b],
                     [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def bcc(a: str) -> Structure:
    return Structure(Lattice.cubic(3.2), [a, a], [[0, 0, 0], [0.5, 0.5, 0.5]])


def fcc(a: str) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(3.9), [a], [[0, 0, 0]])


def hcp(a: str) -> Structure:
    return Structure.from_spacegroup("P6_3/mmc", Lattice.hexagonal(2.9, 4.7), [a], [[1 / 3, 2 / 3, 0.25]])


def diamond(a: str) -> Structure:
    return Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.4), [a], [[0, 0, 0]])


def simple_cubic(a: str) -> Structure:
    return Structure(Lattice.cubic(2.7), [a], [[0, 0, 0]])


PROTOTYPES: dict[str, tuple[Callable[..., Structure], tuple[tuple[str, ...], ...]]] = {
    "rocksalt": (rocksalt, (CATIONS, ANIONS)),
    "cscl": (cscl, (CATIONS, ANIONS)),
    "zincblende": (zincblende, (CATIONS, ANIONS)),
    "fluorite": (fluorite, (CATIONS, ANIONS)),
    "perovskite": (perovskite, (CATIONS, CATIONS, ANIONS)),
    "rutile": (rutile, (CATIONS, ANIONS)),
    "wurtzite": (wurtzite, (CATIONS, ANIONS)),
    "layered": (layered, (CATIONS, CATIONS, ANIONS)),
    "l12": (l12, (METALS, METALS)),
    "bcc": (bcc, (METALS,)),
    "fcc": (fcc, (METALS,)),
    "hcp": (hcp, (METALS,)),
    "diamond": (diamond, (("C", "Si", "Ge", "Sn"),)),
    "simple_cubic": (simple_cubic, (METALS,)),
}


def make(prototype: str, elements: Sequence[str], *, strain: float | np.ndarray = 0.0,
         rattle: float = 0.0, supercell: Sequence[int] | int = 1, seed: int = 0) -> Structure:
    """One prototype with the given elements, scaled, then strained, repeated and rattled.

    ``strain`` is a scalar (isotropic) or a 3x3 strain tensor; ``rattle`` the standard deviation
    (Å) of Gaussian displacements.
    """
    fn, _ = PROTOTYPES[prototype]
    s = _scaled(fn(*elements))
    if np.ndim(strain) == 0:
        if strain:
            s.apply_strain(float(strain))
    else:
        eps = np.asarray(strain, dtype=float)
        s = Structure(Lattice(s.lattice.matrix @ (np.eye(3) + eps)), s.species, s.frac_coords)
    s.make_supercell(supercell)
    if rattle:
        rng = np.random.default_rng(seed)
        s = Structure(s.lattice, s.species, s.cart_coords + rng.normal(0, rattle, (len(s), 3)),
                      coords_are_cartesian=True)
    return s


def random_structures(n: int, *, seed: int = 0, max_atoms: int = 64, strain: float = 0.04,
                      rattle: float = 0.05) -> list[Structure]:
    """``n`` varied structures: random prototype, random elements, random strain and rattle,
    a random supercell up to ``max_atoms`` atoms."""
    rng = np.random.default_rng(seed)
    names = sorted(PROTOTYPES)
    out: list[Structure] = []
    while len(out) < n:
        name = names[int(rng.integers(len(names)))]
        _, pools = PROTOTYPES[name]
        els: list[str] = []
        for pool in pools:
            choices = [e for e in pool if e not in els] or list(pool)
            els.append(str(rng.choice(choices)))
        eps = rng.uniform(-strain, strain, (3, 3))
        eps = (eps + eps.T) / 2
        s = make(name, els, strain=eps, seed=int(rng.integers(1 << 30)), rattle=0.0)
        reps = [1, 1, 1]
        while len(s) * np.prod(reps) * 2 <= max_atoms and rng.random() < 0.6:
            reps[int(rng.integers(3))] += 1
        if len(s) * np.prod(reps) > max_atoms:
            continue
        s.make_supercell(reps)
        if rattle:
            s = Structure(s.lattice, s.species, s.cart_coords + rng.normal(0, rattle, (len(s), 3)),
                          coords_are_cartesian=True)
        out.append(s)
    return out


def demo_structures() -> list[Structure]:
    """A fixed, small set of named crystals for the demo (1 to 64 atoms)."""
    return [
        make("diamond", ["Si"]),
        make("rocksalt", ["Na", "Cl"]),
        make("perovskite", ["Sr", "Ti", "O"]),
        make("layered", ["Li", "Co", "O"]),
        make("rutile", ["Ti", "O"], supercell=(1, 1, 2)),
        make("wurtzite", ["Ga", "N"], supercell=2),
        make("bcc", ["Fe"], supercell=2, rattle=0.05, seed=1),
        make("l12", ["Au", "Cu"], supercell=(2, 2, 2), rattle=0.03, seed=2),
    ]
