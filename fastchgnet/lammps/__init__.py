"""Run our models inside LAMMPS (``fix external``), on one or many MPI ranks.

* :func:`attach` makes a model the potential of a running ``lammps.lammps`` instance;
* :func:`run_input` runs a LAMMPS input script (without ``pair_style``) with a model attached;
* ``fastchgnet lammps in.lammps --model 0.3.0 --elements Si`` does the same from the shell, also
  under ``mpiexec -n N``.

Two parallel modes (:mod:`fastchgnet.lammps.compute`): ``replicated`` (every rank computes the
whole periodic system) and ``local`` (each rank its own atoms plus a ghost shell of one receptive
field, 24 Å for CHGNet 0.3.0). See docs/lammps.md for what each costs. Importing this package
does not import ``lammps``; :func:`import_lammps` does, with the MPI library it needs preloaded.
"""

from fastchgnet.lammps.compute import Terms, receptive_field
from fastchgnet.lammps.fix import MODES, FastCHGNetFix, attach, box_lattice, element_numbers
from fastchgnet.lammps.loader import Comm, find_libmpi, import_lammps, new_lammps
from fastchgnet.lammps.script import run_input, split_script

__all__ = ["MODES", "Comm", "FastCHGNetFix", "Terms", "attach", "box_lattice", "element_numbers",
           "find_libmpi", "import_lammps", "new_lammps", "receptive_field", "run_input",
           "split_script"]
