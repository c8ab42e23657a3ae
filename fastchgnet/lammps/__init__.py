"""Run our models inside LAMMPS (``fix external``), on one or many MPI ranks."""
