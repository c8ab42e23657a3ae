"""Attach a fastchgnet model to a running LAMMPS instance through ``fix external``.

:func:`attach` issues ``pair_style zero``, ``comm_modify cutoff``, ``fix ... external
pf/callback 1 1`` and ``fix_modify ... energy yes virial yes``, and registers a callback that
gives LAMMPS the model's forces, energy, virial and per-atom energies at every force call (MD
steps and minimizer iterations), on any number of MPI ranks (see :mod:`fastchgnet.lammps.compute`
for the two modes).
"""

from __future__ import annotations

import sys
import traceback
from typing import Any, Sequence

import numpy as np
import torch

from fastchgnet.lammps.compute import Terms, cluster_terms, periodic_terms, receptive_field
from fastchgnet.lammps.loader import Comm

__all__ = ["MODES", "FastCHGNetFix", "attach", "box_lattice", "choose_mode", "cluster_fraction",
           "element_numbers"]

MODES = ("auto", "replicated", "local")
# mode="auto" picks "local" only when a rank's cluster (its sub-domain dilated by the receptive
# field) is estimated at most this fraction of the whole box: the model's cost grows with the
# atoms it sees, and a replicated rank sees them all (see docs/lammps.md for the measurements)
LOCAL_MAX_FRACTION = 0.5


def element_numbers(elements: Sequence[str] | str, n_types: int) -> np.ndarray:
    """Atomic numbers of LAMMPS atom types 1..n_types (index 0 unused)."""
    from ase.data import atomic_numbers

    if isinstance(elements, str):
        elements = elements.split()
    elements = list(elements)
    if len(elements) != n_types:
        raise ValueError(f"the LAMMPS box has {n_types} atom type(s) but {len(elements)} "
                         f"element(s) were given ({' '.join(elements) or 'none'}); give one "
                         f"element symbol per atom type, in type order, as in pair_coeff")
    unknown = [e for e in elements if e not in atomic_numbers or atomic_numbers[e] == 0]
    if unknown:
        raise ValueError(f"unknown element symbol(s) {unknown} in the type -> element mapping "
                         f"{elements}")
    return np.array([0] + [atomic_numbers[e] for e in elements], dtype=np.int64)


def box_lattice(lmp: Any) -> tuple[np.ndarray, np.ndarray]:
    """(lattice rows a, b, c in Å, periodicity (3,) bool) of the LAMMPS box (triclinic too)."""
    lo, hi, xy, yz, xz, periodic, _ = lmp.extract_box()
    lx, ly, lz = (hi[k] - lo[k] for k in range(3))
    lat = np.array([[lx, 0.0, 0.0], [xy, ly, 0.0], [xz, yz, lz]], dtype=np.float64)
    return lat, np.asarray(periodic, dtype=bool)


def cluster_fraction(lengths: Sequence[float], grid: Sequence[int], radius: float) -> float:
    """Volume of one sub-domain dilated by ``radius`` (Minkowski sum with a ball, periodic images
    included) over the box volume: the share of the system one rank's local cluster holds."""
    a, b, c = (float(x) / max(int(g), 1) for x, g in zip(lengths, grid))
    v = (a * b * c + 2 * radius * (a * b + b * c + c * a) + np.pi * radius**2 * (a + b + c)
         + 4 / 3 * np.pi * radius**3)
    return v / max(float(np.prod(lengths)), 1e-300)


def choose_mode(mode: str, n_ranks: int, fraction: float) -> str:
    """The parallel mode to use: ``mode`` unless it is ``"auto"``, which picks ``"local"`` on
    several ranks when a rank's cluster is at most LOCAL_MAX_FRACTION of the system."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    return "local" if n_ranks > 1 and fraction <= LOCAL_MAX_FRACTION else "replicated"


class FastCHGNetFix:
    """The callback object behind :func:`attach` (``lmp.set_fix_external_callback``).

    Attributes: ``mode`` (``"replicated"`` or ``"local"``), ``n_calls``, ``last`` (the last
    :class:`~fastchgnet.lammps.compute.Terms` of this rank), ``error`` (the first exception raised
    in a callback: the fix then stops the run with LAMMPS's timeout and :meth:`check` raises it).
    """

    def __init__(self, lmp: Any, model: torch.nn.Module, elements: Sequence[str] | str, *,
                 mode: str = "auto", fix_id: str = "fastchgnet", on_isolated_atoms: str = "error",
                 comm: Comm | None = None) -> None:
        self.lmp = lmp
        self.model = model
        self.fix_id = fix_id
        self.on_isolated_atoms = on_isolated_atoms
        self.comm = comm or Comm(lmp)
        self.numbers = element_numbers(elements, int(lmp.extract_global("ntypes")))
        self.radius = receptive_field(model)
        lat, _ = box_lattice(lmp)
        self.fraction = cluster_fraction(np.abs(np.diag(lat)), lmp.extract_global("procgrid"),
                                         self.radius)
        self.mode = choose_mode(mode, self.comm.size, self.fraction)
        self.n_calls = 0
        self.last: Terms | None = None
        self.error: BaseException | None = None

    # ------------------------------------------------------------------------------------------
    def _types(self, n: int) -> np.ndarray:
        t = np.asarray(self.lmp.numpy.extract_atom("type", nelem=n), dtype=np.int64)[:n]
        bad = (t < 1) | (t >= self.numbers.size)
        if bad.any():
            raise ValueError(f"atom type {int(t[bad][0])} has no element "
                             f"(elements are given for types 1..{self.numbers.size - 1})")
        return self.numbers[t]

    def _n_ids(self, tag: np.ndarray) -> int:
        """The largest atom id over all ranks."""
        top = np.zeros(self.comm.size)
        top[self.comm.rank] = float(tag.max()) if tag.size else 0.0
        return int(self.comm.sum(top).max())

    def _sum(self, size: int, fill: Any) -> np.ndarray:
        """Sum over ranks of the float64 vector of length ``size`` that ``fill()`` builds on each
        rank; every rank reaches the reduction even where ``fill`` fails (the others would wait
        for ever), and then all of them raise."""
        flat = np.zeros(size + 1)
        try:
            flat[:-1] = np.asarray(fill(), dtype=np.float64).ravel()
        except Exception as exc:
            self.error = self.error or exc
            flat[-1] = 1.0
        tot = self.comm.sum(flat)
        if tot[-1] > 0:
            raise self.error or RuntimeError("the model failed on another MPI rank")
        return tot[:-1]

    def _replicated(self, nlocal: int, tag: np.ndarray, x: np.ndarray) -> Terms:
        idx = tag.astype(np.int64) - 1

        n_ids = self._n_ids(tag)

        def fill() -> np.ndarray:
            buf = np.zeros((n_ids, 5))
            buf[idx, 0:3] = x
            buf[idx, 3] = self._types(nlocal)
            buf[idx, 4] = 1.0
            return buf

        buf = self._sum(n_ids * 5, fill).reshape(n_ids, 5)
        present = buf[:, 4] > 0.5
        if not present.all():  # ids with gaps: keep the atoms that exist, in id order
            rows = np.flatnonzero(present)
            remap = np.full(n_ids, -1, dtype=np.int64)
            remap[rows] = np.arange(rows.size)
            buf, idx = buf[rows], remap[idx]
        lat, pbc = box_lattice(self.lmp)
        terms = periodic_terms(self.model, np.rint(buf[:, 3]).astype(np.int64), buf[:, :3], lat,
                               pbc, on_isolated_atoms=self.on_isolated_atoms)
        return Terms(terms.energy, terms.forces[idx], terms.energies[idx], terms.virial)

    def _local(self, nlocal: int, tag: np.ndarray) -> Terms:
        lmp = self.lmp
        part: dict[str, Any] = {}

        n_ids = self._n_ids(tag)

        def fill() -> np.ndarray:
            nall = nlocal + int(lmp.extract_setting("nghost"))
            xs = np.array(lmp.numpy.extract_atom("x", nelem=nall, dim=3)[:nall], dtype=np.float64)
            ids = np.asarray(lmp.numpy.extract_atom("id", nelem=nall), dtype=np.int64)[:nall]
            terms, kept = cluster_terms(self.model, self._types(nall), xs, nlocal,
                                        on_isolated_atoms=self.on_isolated_atoms,
                                        label=f"MPI rank {self.comm.rank}")
            part["terms"] = terms
            buf = np.zeros((n_ids, 3))
            np.add.at(buf, ids[kept] - 1, terms.forces)
            extra = np.zeros(7)  # the energy and the virial of this rank
            extra[0], extra[1:7] = terms.energy, terms.virial
            return np.concatenate([buf.ravel(), extra])

        flat = self._sum(n_ids * 3 + 7, fill)
        forces = flat[:n_ids * 3].reshape(n_ids, 3)[tag.astype(np.int64) - 1]
        extra = flat[n_ids * 3:]
        return Terms(float(extra[0]), forces, part["terms"].energies, extra[1:7].copy())

    # ------------------------------------------------------------------------------------------
    def __call__(self, caller: Any, ntimestep: int, nlocal: int, tag: np.ndarray, x: np.ndarray,
                 f: np.ndarray) -> None:
        """The ``fix external`` callback: set forces, energy, virial, per-atom energies."""
        if self.error is not None:
            f[:] = 0.0
            return
        try:
            if self.mode == "local":
                terms = self._local(nlocal, tag)
            else:
                terms = self._replicated(nlocal, tag, x)
            f[:] = terms.forces
            self.lmp.fix_external_set_energy_global(self.fix_id, float(terms.energy))
            self.lmp.fix_external_set_virial_global(self.fix_id, [float(v) for v in terms.virial])
            if nlocal:
                self.lmp.fix_external_set_energy_peratom(self.fix_id, np.ascontiguousarray(
                    terms.energies, dtype=np.float64))
            self.last = terms
            self.n_calls += 1
        except Exception as exc:  # a Python exception must not pass through LAMMPS's C++ frames
            self.error = self.error or exc
            f[:] = 0.0
            print(f"fastchgnet.lammps: the model failed at step {ntimestep} on rank "
                  f"{self.comm.rank}; stopping the run:\n{traceback.format_exc()}",
                  file=sys.stderr, flush=True)
            self.lmp.force_timeout()

    def check(self) -> None:
        """Raise the error of a failed callback (the run was stopped early), if any."""
        if self.error is not None:
            raise RuntimeError(f"fastchgnet fix {self.fix_id!r} failed: {self.error}") from self.error


def attach(lmp: Any, model: Any, elements: Sequence[str] | str, *, mode: str = "auto",
           device: str | torch.device | None = None, dtype: torch.dtype | None = None,
           fix_id: str = "fastchgnet", group: str = "all",
           on_isolated_atoms: str = "error", skin: float = 2.0) -> FastCHGNetFix:
    """Make a fastchgnet model the potential of a LAMMPS instance whose box and atoms exist.

    Args:
        lmp: a ``lammps.lammps`` instance (``units metal``, no pair style needed or wanted).
        model: a fastchgnet model, a pretrained name (``"0.3.0"``) or a checkpoint path.
        elements: the element of each atom type, in type order (``["Li", "Mn", "O"]`` or
            ``"Li Mn O"``), as one would write in ``pair_coeff * * ... Li Mn O``.
        mode: ``"replicated"`` (every rank computes the whole system), ``"local"`` (each rank
            its own atoms with a ghost shell of one receptive field) or ``"auto"``.
        device, dtype: where and in what precision the model runs (default CPU when the model is
            loaded here; the model's own for a model object).
        fix_id, group: the fix's id and group (the model always sees every atom).
        on_isolated_atoms: ``"error"``, ``"warn"`` or ``"ignore"``, as in the ASE calculator.
        skin: the run's neighbour skin (Å; LAMMPS's metal default is 2). The local mode asks for
            ghosts out to R + skin, which is exact as long as LAMMPS re-neighbours before an
            atom moves more than skin / 2 (its default ``neigh_modify check yes``): give the
            value of your ``neighbor`` command if it is larger. Not used in replicated mode.

    Returns the :class:`FastCHGNetFix` (keep a reference while LAMMPS runs). It issues
    ``pair_style zero <cutoff>``, ``pair_coeff * *``, ``comm_modify cutoff <ghost cutoff>``,
    ``fix <fix_id> <group> external pf/callback 1 1`` and ``fix_modify <fix_id> energy yes
    virial yes``.

    Raises:
        ValueError: units other than metal, a box without atoms, a wrong element list.
    """
    from fastchgnet.md.calculator import resolve_model

    units = lmp.extract_global("units")
    if units != "metal":
        raise ValueError(f"fastchgnet models need LAMMPS 'units metal' (eV, Å, ps, bar); this "
                         f"LAMMPS instance uses 'units {units}'")
    if not lmp.extract_setting("box_exist"):
        raise ValueError("the LAMMPS box does not exist yet: attach the model after read_data, "
                         "create_box/create_atoms or read_restart")
    if int(lmp.get_natoms()) == 0:
        raise ValueError("the LAMMPS box has no atoms: create or read them before attaching")
    if device is None and not isinstance(model, torch.nn.Module):
        device = "cpu"
    net = resolve_model(model, device, dtype)
    comm = Comm(lmp)
    cutoff = float(net.config.atom_graph_cutoff)
    fix = FastCHGNetFix(lmp, net, elements, mode=mode, fix_id=fix_id,
                        on_isolated_atoms=on_isolated_atoms, comm=comm)
    lmp.command(f"pair_style zero {cutoff:g}")
    lmp.command("pair_coeff * *")
    if fix.mode == "local":
        lmp.command(f"comm_modify cutoff {fix.radius + float(skin):g}")
    lmp.command(f"fix {fix_id} {group} external pf/callback 1 1")
    lmp.command(f"fix_modify {fix_id} energy yes virial yes")
    lmp.set_fix_external_callback(fix_id, fix, None)
    return fix
