"""Crystal graphs built on the device (GPU or CPU) with torch, and a Verlet-skin neighbour list.

The bond and angle sets are those of :func:`fastchgnet.data.build_graph` + :func:`collate` (same
undirected bonds with the same canonical direction and images, same angles; the order of bonds
and angles differs, which does not change the model's output). Everything runs in torch on the
tensors' device: no Python loop over atoms, bonds or structures, and no dense ``N x N`` matrix.

Neighbour search is a cell list in fractional coordinates, per structure: each periodic axis is
cut into ``nb`` slabs at least ``cutoff / 2`` thick (perpendicular height), and an atom looks at
the slabs within ``m = floor(cutoff * nb / height) + 1`` of its own. When the cutoff spans several
periodic images (small cells), ``m`` grows and the search walks over the images; every (slab
offset) maps to one (slab, image) pair, so no pair is found twice.

Host syncs (data-dependent sizes; nothing else syncs):

* each call of :meth:`VerletGraph.update` (one MD step): **one** sync, which fetches the number of
  bonds and angles, the rebuild flag and the input checks together;
* a rebuild (the first call, or when an atom moved too far): three more — the bin-grid shape per
  structure, the number of candidate pairs and the number of pairs within ``cutoff + skin`` (these
  two once per chunk of ``chunk`` atom-stencil entries: one chunk up to ~4,000 atoms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from fastchgnet.data.batch import Batch
from fastchgnet.data.graph import (DEFAULT_MIN_DISTANCE, MAX_ATOMIC_NUMBER, OnIsolated, graph_size_problems,
                                   structure_arrays)

# (atom, stencil-slab) entries expanded at once during a rebuild. Each entry expands to the atoms
# of one slab (2-4 at crystal densities with slabs of half of a 6-7 Å cutoff), so a chunk holds
# about 1-2 million candidate pairs (~100 MB of temporaries): bounded memory for any cell size,
# and one chunk (one sync) for cells up to ~4,000 atoms.
DEFAULT_CHUNK = 1 << 19
# Slabs per cutoff length: thinner slabs (2) cut the searched volume from up to (3 r)^3 to about
# (2.5 r)^3 at the price of 125 instead of 27 slab visits per atom. Measured on 1 CPU thread
# (fresh build, r = 6 Å): 864 atoms 160 -> 116 ms, 2,048 atoms 462 -> 206 ms.
BINS_PER_CUTOFF = 2
# Safety margin (Å) of the slab stencil against rounding of the fractional coordinates.
_BIN_MARGIN = 1e-4


@dataclass
class GraphInputs:
    """Geometry of a batch of structures as flat tensors (the inputs of the device graph)."""

    atomic_numbers: Tensor  # (n_atoms,) int64
    positions: Tensor  # (n_atoms, 3) float, Cartesian Å
    lattice: Tensor  # (n_graphs, 3, 3) float, rows are lattice vectors
    n_atoms: Tensor  # (n_graphs,) int64
    pbc: Tensor  # (n_graphs, 3) bool


def graph_inputs(structures: Sequence[Any], device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> GraphInputs:
    """Flat tensors of pymatgen Structures / ASE Atoms (one host-to-device copy per field)."""
    arrs = [structure_arrays(s) for s in structures]
    if not arrs:
        raise ValueError("no structures given")

    def t(a: np.ndarray, dt: torch.dtype) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dt)

    return GraphInputs(
        atomic_numbers=t(np.concatenate([a[0] for a in arrs]), torch.int64),
        positions=t(np.concatenate([a[1] for a in arrs]), dtype),
        lattice=t(np.stack([a[2] for a in arrs]), dtype),
        n_atoms=t(np.array([a[0].shape[0] for a in arrs]), torch.int64),
        pbc=t(np.stack([a[3] for a in arrs]), torch.bool),
    )


def _as_pbc(pbc: Any, n_graphs: int, device: torch.device) -> Tensor:
    p = torch.as_tensor(pbc, dtype=torch.bool, device=device)
    if p.ndim == 0:
        p = p.expand(3)
    if p.ndim == 1:
        p = p.expand(n_graphs, 3)
    if p.shape != (n_graphs, 3):
        raise ValueError(f"pbc must be a bool, (3,) or (n_graphs, 3), got shape {tuple(p.shape)}")
    return p.contiguous()


def _compact(mask: Tensor, n: int) -> Tensor:
    """Indices of the True entries of ``mask`` (whose count ``n`` is known): nonzero, no sync."""
    pos = torch.cumsum(mask, 0) - 1
    tgt = torch.where(mask, pos, torch.full_like(pos, n))
    out = torch.zeros(n + 1, dtype=torch.int64, device=mask.device)
    out.scatter_(0, tgt, torch.arange(mask.shape[0], device=mask.device))
    return out[:n]


def _segment_arange(counts: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """(owner, rank) of ``total = counts.sum()`` items: item k belongs to segment ``owner[k]`` and
    is the ``rank[k]``-th of it."""
    owner = torch.repeat_interleave(counts, output_size=total)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(total, device=counts.device) - starts.index_select(0, owner)
    return owner, rank


def _bond_vectors(pos: Tensor, lattice: Tensor, src: Tensor, dst: Tensor, img: Tensor,
                  graph: Tensor) -> Tensor:
    """``x_src - x_dst - img @ L`` (the model's bond vector formula, so lengths match it)."""
    shift = torch.bmm(img.to(pos.dtype).unsqueeze(1), lattice.index_select(0, graph)).squeeze(1)
    return pos.index_select(0, src) - pos.index_select(0, dst) - shift


def inverse_cell(lat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(inverse, cross products of lattice-vector pairs (G, 3, 3), signed volume) of 3x3 cells.

    Written out with cross products: ``torch.linalg.inv``/``det`` check for singular input and
    so synchronise with the host on CUDA.
    """
    cross = torch.stack([torch.linalg.cross(lat[:, 1], lat[:, 2]),
                         torch.linalg.cross(lat[:, 2], lat[:, 0]),
                         torch.linalg.cross(lat[:, 0], lat[:, 1])], 1)
    vol = (lat[:, 0] * cross[:, 0]).sum(1)
    return cross.transpose(1, 2) / vol[:, None, None], cross, vol


def _count(index: Tensor, n: int) -> Tensor:
    """``bincount(index, minlength=n)`` of known length (bincount syncs on CUDA to find the max)."""
    return torch.zeros(n, dtype=torch.int64, device=index.device).index_add_(
        0, index, torch.ones_like(index))


def _frac(pos: Tensor, inv_lattice: Tensor, atom_graph: Tensor) -> Tensor:
    return torch.bmm(pos.double().unsqueeze(1), inv_lattice.index_select(0, atom_graph)).squeeze(1)


def neighbor_pairs(positions: Tensor, lattice: Tensor, atom_graph: Tensor, n_atoms: Tensor,
                   pbc: Tensor, cutoff: float, chunk: int = DEFAULT_CHUNK, *,
                   bond_cutoff: float | None = None, min_distance: float = 0.0,
                   names: Sequence[Any] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """All undirected pairs within ``cutoff`` (Å), each once in its canonical direction.

    Returns ``(src, dst, image)`` (int64; image (n_pairs, 3)), with ``|x_src - x_dst - image @ L|
    <= cutoff`` and the canonical direction of :func:`fastchgnet.data.build_graph` (``src < dst``,
    or ``src == dst`` with the first non-zero image component positive). Cell list, no N x N matrix.

    Before any pair is expanded, every structure is checked with
    :func:`fastchgnet.data.graph.graph_size_problems` (the stencil size per atom counts as its
    periodic images; ``bond_cutoff`` defaults to half the cutoff, ``min_distance`` 0 skips the
    density rule): a flat, tiny or singular cell raises ValueError naming the structure (its
    index, or ``names[index]``) instead of exhausting memory. The check rides on the first sync.
    """
    dev = positions.device
    lat = lattice.double()
    inv, cross, vol = inverse_cell(lat)
    frac = _frac(positions, inv, atom_graph)
    pbc_a = pbc.index_select(0, atom_graph)
    shift = torch.where(pbc_a, torch.floor(frac), torch.zeros_like(frac))  # wrap periodic axes
    fw = frac - shift
    height = vol.abs()[:, None] / torch.linalg.vector_norm(cross, dim=2)  # (G, 3) slab heights
    r = float(cutoff) + _BIN_MARGIN
    # at most ~2 n^(1/3) slabs per axis: sparse cells (vacuum) do not get mostly empty bins
    cap = torch.ceil(2.0 * n_atoms.double().clamp(min=1) ** (1.0 / 3.0))[:, None]
    nb = torch.minimum(torch.floor(BINS_PER_CUTOFF * height / r).clamp(min=1), cap)
    nb = torch.where(pbc, nb, torch.ones_like(nb))
    m = torch.where(pbc, torch.floor(r * nb / height) + 1, torch.zeros_like(nb))
    # size check of every structure, in float64 (a flat cell's stencil overflows int64)
    n_graphs = lattice.shape[0]
    idx3 = atom_graph[:, None].expand(-1, 3)
    lo = frac.new_full((n_graphs, 3), float("inf")).scatter_reduce(0, idx3, frac, "amin")
    hi = frac.new_full((n_graphs, 3), float("-inf")).scatter_reduce(0, idx3, frac, "amax")
    stencil_f = (2 * m + 1).prod(1)
    n_f = n_atoms.double()
    check = torch.cat([stencil_f[:, None], n_f[:, None], vol.abs()[:, None], height,
                       (hi - lo).clamp(min=0), pbc.double()], 1)
    # sync 1: grid shape, stencil sizes and the size check
    vals = torch.cat([torch.stack([nb.prod(1).sum(), (stencil_f * n_f).sum()]),
                      check.reshape(-1)]).tolist()
    per_graph = np.asarray(vals[2:], dtype=np.float64).reshape(n_graphs, 12)
    problems = graph_size_problems(
        per_graph[:, 1], per_graph[:, 2], per_graph[:, 3:6], per_graph[:, 9:12] > 0.5, per_graph[:, 6:9],
        atom_cutoff=float(cutoff), bond_cutoff=float(cutoff) / 2 if bond_cutoff is None else bond_cutoff,
        min_distance=min_distance, n_images=per_graph[:, 0])
    if problems:
        g, msg = problems[0]
        raise ValueError(f"structure {names[g] if names is not None else g} {msg}")
    meta = torch.cat([nb, m], 1).long()
    nb, m = meta[:, :3], meta[:, 3:]
    width = 2 * m + 1
    n_stencil = width.prod(1)  # (G,)
    n_bins = nb.prod(1)
    total_bins, total_entries = int(vals[0]), int(vals[1])

    # wrapped Cartesian positions, in the positions' dtype (candidates are within the cutoff up
    # to round-off; callers that filter exactly add a margin)
    lat_w = lattice.to(positions.dtype)
    xw = positions - torch.bmm(shift.to(positions.dtype).unsqueeze(1),
                               lat_w.index_select(0, atom_graph)).squeeze(1)
    r_keep = float(cutoff)
    bin_off = torch.cumsum(n_bins, 0) - n_bins
    nb_a = nb.index_select(0, atom_graph)
    b = torch.minimum(torch.floor(fw * nb_a).long().clamp(min=0), nb_a - 1)  # (N, 3)

    def lin(bb: Tensor, nbb: Tensor, g: Tensor) -> Tensor:
        return (bb[:, 0] * nbb[:, 1] + bb[:, 1]) * nbb[:, 2] + bb[:, 2] + bin_off.index_select(0, g)

    atom_bin = lin(b, nb_a, atom_graph)
    order = torch.argsort(atom_bin, stable=True)
    bin_count = _count(atom_bin, total_bins)
    bin_start = torch.cumsum(bin_count, 0) - bin_count

    # (atom, stencil offset) entries, processed in chunks
    ent_atom, ent_rank = _segment_arange(n_stencil.index_select(0, atom_graph), total_entries)
    out_src, out_dst, out_img = [], [], []
    for lo in range(0, total_entries, chunk):
        ai, t = ent_atom[lo:lo + chunk], ent_rank[lo:lo + chunk]
        g = atom_graph.index_select(0, ai)
        w, mm, nbg = width.index_select(0, g), m.index_select(0, g), nb.index_select(0, g)
        d2 = t % w[:, 2]
        t2 = torch.div(t, w[:, 2], rounding_mode="floor")
        d1 = t2 % w[:, 1]
        d0 = torch.div(t2, w[:, 1], rounding_mode="floor")
        u = b.index_select(0, ai) + torch.stack([d0, d1, d2], 1) - mm  # unwrapped slab index
        tb = torch.remainder(u, nbg)
        img_bin = torch.div(u, nbg, rounding_mode="floor")  # periodic image of the target slab
        tl = lin(tb, nbg, g)
        # per entry: the centre's wrapped position minus the target slab's image shift, so that
        # a candidate's vector is one gather and one subtraction
        base = xw.index_select(0, ai) - torch.bmm(img_bin.to(xw.dtype).unsqueeze(1),
                                                  lat_w.index_select(0, g)).squeeze(1)
        # for i == j the image is img_bin: canonical if its first non-zero component is > 0
        fnz = torch.where(img_bin[:, 0] != 0, img_bin[:, 0],
                          torch.where(img_bin[:, 1] != 0, img_bin[:, 1], img_bin[:, 2]))
        cnt = bin_count.index_select(0, tl)
        n_cand = int(cnt.sum())  # sync 2 (per chunk)
        ci, k = _segment_arange(cnt, n_cand)
        j = order.index_select(0, bin_start.index_select(0, tl.index_select(0, ci)) + k)
        i = ai.index_select(0, ci)
        vec = base.index_select(0, ci) - xw.index_select(0, j)
        canon = (i < j) | ((i == j) & (fnz.index_select(0, ci) > 0))
        keep = canon & ((vec * vec).sum(1) <= r_keep * r_keep)
        sel = torch.nonzero(keep).squeeze(1)  # sync 3 (per chunk)
        ci, i, j = ci.index_select(0, sel), i.index_select(0, sel), j.index_select(0, sel)
        img = (img_bin.index_select(0, ci) + shift.index_select(0, i).long()
               - shift.index_select(0, j).long())
        out_src.append(i)
        out_dst.append(j)
        out_img.append(img)
    if not out_src:
        e = torch.zeros(0, dtype=torch.int64, device=dev)
        return e, e, torch.zeros(0, 3, dtype=torch.int64, device=dev)
    return torch.cat(out_src), torch.cat(out_dst), torch.cat(out_img)


def build_angles(src: Tensor, dst: Tensor, short: Tensor, n_atoms_total: int, n_short: int,
                 n_angles: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Angles of the bond graph: ordered pairs of distinct short directed bonds at one centre.

    Args:
        src, dst: the undirected bonds (bond ``u`` is directed ``src -> dst`` with sign +1).
        short: (n_bonds,) bool, bonds shorter than the bond-graph cutoff.
        n_short, n_angles: their counts (``sum_c k_c (k_c - 1)`` over centres with ``k_c`` short
            directed bonds), known beforehand so that no size needs a sync here.

    Returns ``(center, bond1, bond2, sign)``; ``sign`` is the product of the two legs' directions.
    """
    dev = src.device
    nb = src.shape[0]
    und = torch.arange(nb, device=dev).repeat(2)
    centre_dir = torch.cat([src, dst])
    sd = _compact(short.repeat(2), 2 * n_short)  # short directed bonds
    cen = centre_dir.index_select(0, sd)
    o = torch.argsort(cen, stable=True)
    sd, cen = sd.index_select(0, o), cen.index_select(0, o)
    k = _count(cen, n_atoms_total)
    start = torch.cumsum(k, 0) - k
    rank = torch.arange(cen.shape[0], device=dev) - start.index_select(0, cen)
    first, t = _segment_arange(k.index_select(0, cen) - 1, n_angles)
    # the second leg runs over the centre's other short bonds: skip the first leg's own rank
    second = start.index_select(0, cen.index_select(0, first)) + t + (t >= rank.index_select(0, first)).long()
    d1, d2 = sd.index_select(0, first), sd.index_select(0, second)
    sign = (1 - 2 * (d1 >= nb).long()) * (1 - 2 * (d2 >= nb).long())
    return cen.index_select(0, first), und.index_select(0, d1), und.index_select(0, d2), sign


class VerletGraph:
    """Crystal graphs of a batch of structures on the device, reusing a neighbour list.

    The candidate list holds the pairs within ``atom_cutoff + skin``. It is reused while no atom has
    moved more than ``skin / 2`` since it was built (measured relative to the cell, so a
    deformation of the cell counts, see :meth:`update`); at every call the candidates are filtered
    to the true cutoffs on the device, so a reused list gives exactly the graph of a fresh build.

    Example (e.g. inside an MD loop)::

        vg = VerletGraph(atom_cutoff=6.0, bond_cutoff=3.0, skin=1.0)
        batch = vg.update(numbers, positions, lattice, n_atoms, pbc=True)   # a fastchgnet Batch
        out = model(batch, task="efs")

    Args:
        atom_cutoff, bond_cutoff: graph radii (Å); ``model.graph_kwargs()`` has the model's.
        skin: Verlet skin (Å). 0 rebuilds at every call.
        min_distance: atoms closer than this (Å) raise ValueError, as in ``build_graph``.
        on_isolated_atoms: ``"error"`` | ``"warn"`` | ``"ignore"``, as in ``build_graph``.
        max_atomic_number: largest atomic number accepted.
        chunk: atom-stencil entries expanded at once during a rebuild (memory bound).
    """

    def __init__(self, atom_cutoff: float = 6.0, bond_cutoff: float = 3.0, skin: float = 1.0, *,
                 min_distance: float = DEFAULT_MIN_DISTANCE, on_isolated_atoms: OnIsolated = "error",
                 max_atomic_number: int = MAX_ATOMIC_NUMBER, chunk: int = DEFAULT_CHUNK) -> None:
        if skin < 0:
            raise ValueError(f"skin must be >= 0, got {skin}")
        if on_isolated_atoms not in ("error", "warn", "ignore"):
            raise ValueError(f"on_isolated_atoms must be 'error', 'warn' or 'ignore', got {on_isolated_atoms!r}")
        self.atom_cutoff = float(atom_cutoff)
        self.bond_cutoff = float(bond_cutoff)
        self.skin = float(skin)
        self.min_distance = float(min_distance)
        self.on_isolated_atoms = on_isolated_atoms
        self.max_atomic_number = int(max_atomic_number)
        self.chunk = int(chunk)
        self.n_builds = 0  # rebuilds of the candidate list so far
        self.n_calls = 0
        # optional names of the structures of the batch, used in error messages instead of their
        # index (e.g. their index in a user's list when the batch holds a subset of it)
        self.names: Sequence[Any] | None = None
        self._state: dict[str, Tensor] | None = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, skin: float = 1.0, **kwargs: Any) -> "VerletGraph":
        """A VerletGraph with the model's cutoffs and element range."""
        gk = model.graph_kwargs()  # type: ignore[operator]
        return cls(gk["atom_cutoff"], gk["bond_cutoff"], skin,
                   max_atomic_number=int(gk["max_atomic_number"]), **kwargs)

    def reset(self) -> None:
        """Forget the candidate list (the next update rebuilds)."""
        self._state = None

    # ------------------------------------------------------------------------------------------
    def _build(self, numbers: Tensor, positions: Tensor, lattice: Tensor, atom_graph: Tensor,
               n_atoms: Tensor, pbc: Tensor) -> None:
        # the margin keeps pairs that round-off of the wrapped coordinates could lose; the exact
        # cutoff is applied by _filter with the model's own bond-vector formula
        src, dst, img = neighbor_pairs(positions, lattice, atom_graph, n_atoms, pbc,
                                       self.atom_cutoff + self.skin + _BIN_MARGIN, self.chunk,
                                       bond_cutoff=self.bond_cutoff, min_distance=self.min_distance,
                                       names=self.names)
        inv = inverse_cell(lattice.double())[0]
        self._state = {
            "src": src, "dst": dst, "img": img, "graph": atom_graph.index_select(0, src),
            "frac": _frac(positions, inv, atom_graph), "lattice": lattice.double().clone(),
            "numbers": numbers.clone(), "pbc": pbc.clone(), "atom_graph": atom_graph,
        }
        self.n_builds += 1

    def _reusable(self, numbers: Tensor, positions: Tensor, lattice: Tensor, atom_graph: Tensor,
                  pbc: Tensor) -> tuple[Tensor, Tensor]:
        """(ok, per-atom image shift since the build) — ``ok`` is a device bool.

        With the cell deformed by ``M = L_ref^-1 L`` and ``u_i`` the displacement of atom i from
        its build-time fractional position mapped into the new cell (up to whole lattice vectors,
        so wrapped coordinates are fine), a pair outside ``rc + skin`` at build time is now longer
        than ``sigma_min(M) (rc + skin) - 2 max|u|``. The list is complete while that exceeds
        ``rc``; for a fixed cell this is ``max|u| < skin / 2``.
        """
        st = self._state
        assert st is not None
        lat = lattice.double()
        inv_now = inverse_cell(lat)[0]
        frac_now = _frac(positions, inv_now, atom_graph)
        wrap = torch.where(pbc.index_select(0, atom_graph), torch.round(frac_now - st["frac"]),
                           torch.zeros_like(frac_now))
        ref = torch.bmm((st["frac"] + wrap).unsqueeze(1), lat.index_select(0, atom_graph)).squeeze(1)
        disp = torch.linalg.vector_norm(positions.double() - ref, dim=1)
        n_graphs = lattice.shape[0]
        umax = disp.new_zeros(n_graphs).scatter_reduce(0, atom_graph, disp, "amax", include_self=True)
        # sigma_min(M) >= 1 / (1 + |M^-1 - I|_F): a bound that is tight for small deformations
        # and needs no SVD (which synchronises on CUDA)
        m_inv = torch.bmm(inv_now, st["lattice"])  # M^-1 = L^-1 L_ref
        eye = torch.eye(3, dtype=lat.dtype, device=lat.device)
        smin = 1.0 / (1.0 + torch.linalg.matrix_norm(m_inv - eye))
        rc = self.atom_cutoff
        ok = (smin * (rc + self.skin) - 2.0 * umax > rc).all()
        ok = (ok & (numbers == st["numbers"]).all() & (pbc == st["pbc"]).all()
              & (atom_graph == st["atom_graph"]).all())
        return ok, wrap.long()

    def update(self, atomic_numbers: Tensor, positions: Tensor, lattice: Tensor,
               n_atoms: Tensor | None = None, pbc: Any = True, *,
               atom_graph: Tensor | None = None) -> Batch:
        """The crystal graphs of the current geometry as a :class:`Batch` (on the inputs' device).

        Args:
            atomic_numbers: (n_atoms,) int64.
            positions: (n_atoms, 3) Cartesian Å; the Batch gets this tensor and its dtype.
            lattice: (n_graphs, 3, 3), rows are lattice vectors (or (3, 3) for one structure).
            n_atoms: (n_graphs,) atoms per structure (atoms of a structure are contiguous), or
            atom_graph: (n_atoms,) structure index of each atom (sorted); one of the two.
            pbc: bool, (3,) or (n_graphs, 3).

        Raises ValueError naming the structure for atoms closer than ``min_distance``, isolated
        atoms (per ``on_isolated_atoms``) or unknown elements.
        """
        if lattice.ndim == 2:
            lattice = lattice.unsqueeze(0)
        dev = positions.device
        n_graphs = lattice.shape[0]
        if n_atoms is None and atom_graph is None:
            if n_graphs != 1:
                raise ValueError("give n_atoms or atom_graph for more than one structure")
            n_atoms = torch.tensor([positions.shape[0]], device=dev)
        if atom_graph is None:
            atom_graph = torch.repeat_interleave(torch.arange(n_graphs, device=dev), n_atoms,
                                                 output_size=positions.shape[0])
        if n_atoms is None:
            n_atoms = _count(atom_graph, n_graphs)
        pbc_t = _as_pbc(pbc, n_graphs, dev)
        st = self._state
        same_shape = (st is not None and st["numbers"].shape == atomic_numbers.shape
                      and st["lattice"].shape[0] == n_graphs
                      and (st["atom_graph"] is atom_graph
                           or st["atom_graph"].shape == atom_graph.shape))
        if not same_shape or self.skin == 0:
            self._build(atomic_numbers, positions, lattice, atom_graph, n_atoms, pbc_t)
            ok = torch.ones((), dtype=torch.bool, device=dev)
            wrap = torch.zeros_like(positions, dtype=torch.int64)
        else:
            ok, wrap = self._reusable(atomic_numbers, positions, lattice, atom_graph, pbc_t)
        self.n_calls += 1
        batch, rebuild = self._filter(atomic_numbers, positions, lattice, atom_graph, n_atoms,
                                      pbc_t, ok, wrap)
        if rebuild:
            self._build(atomic_numbers, positions, lattice, atom_graph, n_atoms, pbc_t)
            ok = torch.ones((), dtype=torch.bool, device=dev)
            batch, _ = self._filter(atomic_numbers, positions, lattice, atom_graph, n_atoms, pbc_t,
                                    ok, torch.zeros_like(positions, dtype=torch.int64))
        assert batch is not None
        return batch

    def _filter(self, numbers: Tensor, positions: Tensor, lattice: Tensor, atom_graph: Tensor,
                n_atoms: Tensor, pbc: Tensor, ok: Tensor, wrap: Tensor) -> tuple[Batch | None, bool]:
        """Filter the candidates to the cutoffs; ``(None, True)`` if the list must be rebuilt."""
        st = self._state
        assert st is not None
        src, dst, graph = st["src"], st["dst"], st["graph"]
        img = st["img"] + wrap.index_select(0, src) - wrap.index_select(0, dst)
        vec = _bond_vectors(positions, lattice, src, dst, img, graph)
        length = torch.linalg.vector_norm(vec, dim=1)
        in_ag = length <= self.atom_cutoff
        short = in_ag & (length < self.bond_cutoff)
        n_tot = positions.shape[0]
        k = torch.zeros(n_tot, dtype=torch.int64, device=positions.device)
        k = k.index_add(0, src, short.long()).index_add(0, dst, short.long())
        deg = torch.zeros_like(k).index_add(0, src, in_ag.long()).index_add(0, dst, in_ag.long())
        big = torch.full_like(length, float("inf"))
        min_len = torch.where(in_ag, length, big).min() if length.numel() else big.new_tensor(float("inf"))
        bad_z = ((numbers < 1) | (numbers > self.max_atomic_number)).sum()
        # the one sync of a step
        vals = torch.stack([ok.long().to(torch.float64), in_ag.sum().double(), short.sum().double(),
                            (k * (k - 1)).sum().double(), min_len.double(),
                            (deg == 0).sum().double(), bad_z.double(),
                            (~torch.isfinite(positions)).sum().double()]).tolist()
        if not vals[0]:
            return None, True
        n_bonds, n_short, n_angles = int(vals[1]), int(vals[2]), int(vals[3])
        self._check(vals[4:], numbers, positions, lattice, atom_graph, length, in_ag, deg,
                    src, dst)
        sel = _compact(in_ag, n_bonds)
        b_src, b_dst = src.index_select(0, sel), dst.index_select(0, sel)
        short_sel = short.index_select(0, sel)
        center, b1, b2, sign = build_angles(b_src, b_dst, short_sel, n_tot, n_short, n_angles)
        # the angles' rows: the short bonds (a superset of the legs: a short bond whose atoms
        # have no other short bond is in no angle, and its update is an empty sum)
        local = torch.cumsum(short_sel, 0) - 1
        dtype = positions.dtype
        batch = Batch(
            atomic_numbers=numbers, positions=positions, lattice=lattice, atom_graph=atom_graph,
            n_atoms=n_atoms, bond_src=b_src, bond_dst=b_dst,
            bond_image=img.index_select(0, sel).to(dtype), bond_graph=graph.index_select(0, sel),
            angle_center=center, angle_bond1=b1, angle_bond2=b2, angle_sign=sign.to(dtype),
            num_graphs=lattice.shape[0], angle_rows=_compact(short_sel, n_short),
            angle_row1=local.index_select(0, b1), angle_row2=local.index_select(0, b2),
        )
        return batch, False

    def _check(self, vals: list[float], numbers: Tensor, positions: Tensor, lattice: Tensor,
               atom_graph: Tensor, length: Tensor, in_ag: Tensor, deg: Tensor, src: Tensor,
               dst: Tensor) -> None:
        """Raise/warn for bad input; the extra host work runs only when something is wrong.

        Messages name the structure (its index in the batch) and atoms by their index in it."""
        min_len, n_iso, n_bad_z, n_nonfinite = vals
        if not (n_nonfinite or n_bad_z or min_len < self.min_distance or n_iso):
            return
        ag = atom_graph.cpu()
        first = torch.searchsorted(ag, torch.arange(int(ag.max()) + 1))

        def local(i: int) -> int:
            return i - int(first[int(ag[i])])

        names = self.names

        def who(i: int) -> str:
            g = int(ag[i])
            return f"structure {names[g] if names is not None else g}"

        if n_nonfinite:
            i = int(torch.nonzero(~torch.isfinite(positions).all(1))[0])
            raise ValueError(f"{who(i)} has a non-finite (NaN/inf) coordinate at "
                             f"atom {local(i)}")
        if n_bad_z:
            i = int(torch.nonzero((numbers < 1) | (numbers > self.max_atomic_number))[0])
            raise ValueError(f"{who(i)} has an element the model does not know: "
                             f"atomic number {int(numbers[i])} at atom {local(i)} (the model "
                             f"covers Z = 1..{self.max_atomic_number})")
        if min_len < self.min_distance:
            u = int(torch.argmin(torch.where(in_ag, length, torch.full_like(length, float("inf")))))
            i, j = int(src[u]), int(dst[u])
            raise ValueError(f"{who(i)} has atoms {local(i)} and {local(j)} only "
                             f"{float(length[u]):.4f} Å apart (minimum allowed "
                             f"{self.min_distance} Å)")
        if n_iso and self.on_isolated_atoms != "ignore":
            i = int(torch.nonzero(deg == 0)[0])
            msg = (f"{who(i)} has isolated atoms ({int(n_iso)} in the batch, no "
                   f"neighbour within {self.atom_cutoff} Å), e.g. atom {local(i)}")
            if self.on_isolated_atoms == "error":
                raise ValueError(msg)
            import warnings

            warnings.warn(msg, stacklevel=3)


def device_graph(atomic_numbers: Tensor, positions: Tensor, lattice: Tensor,
                 n_atoms: Tensor | None = None, pbc: Any = True, *, atom_graph: Tensor | None = None,
                 atom_cutoff: float = 6.0, bond_cutoff: float = 3.0, **kwargs: Any) -> Batch:
    """One-off crystal graphs on the device (a :class:`VerletGraph` with no skin); see there."""
    vg = VerletGraph(atom_cutoff, bond_cutoff, skin=0.0, **kwargs)
    return vg.update(atomic_numbers, positions, lattice, n_atoms, pbc, atom_graph=atom_graph)


def device_batch(structures: Sequence[Any], device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, **kwargs: Any) -> Batch:
    """Structures (pymatgen / ASE) to a :class:`Batch` whose graphs are built on ``device``."""
    gi = graph_inputs(structures, device, dtype)
    return device_graph(gi.atomic_numbers, gi.positions, gi.lattice, gi.n_atoms, gi.pbc, **kwargs)


class GraphBuilder:
    """``builder(structure) -> Batch``: one structure at a time (e.g. from an ASE calculator),
    on the model's device and dtype, reusing a :class:`VerletGraph` between calls.

    The structure's arrays are copied to the device at each call (ASE holds them on the host);
    the graph itself is built or reused on the device.
    """

    def __init__(self, verlet: VerletGraph, device: torch.device | str | None,
                 dtype: torch.dtype) -> None:
        self.verlet, self.device, self.dtype = verlet, device, dtype

    def __call__(self, structure: Any) -> Batch:
        gi = graph_inputs([structure], self.device, self.dtype)
        try:
            return self.verlet.update(gi.atomic_numbers, gi.positions, gi.lattice, gi.n_atoms,
                                      gi.pbc)
        except ValueError as exc:  # name the structure by its formula, not "structure 0"
            raise ValueError(str(exc).replace("structure 0", f"structure {_formula(structure)}",
                                              1)) from None


def _formula(structure: Any) -> str:
    if hasattr(structure, "get_chemical_formula"):
        return structure.get_chemical_formula()
    return structure.composition.formula.replace(" ", "")


def make_builder(model: torch.nn.Module, *, skin: float = 1.0, **kwargs: Any) -> GraphBuilder:
    """A :class:`GraphBuilder` with the model's cutoffs, device and dtype (``kwargs`` go to
    :class:`VerletGraph`, e.g. ``on_isolated_atoms``)."""
    p = next(model.parameters())
    return GraphBuilder(VerletGraph.for_model(model, skin, **kwargs), p.device, p.dtype)
