"""What a CHGNet user computes on top of energies and forces: the Hessian, atomic charges from
magnetic moments, D3 dispersion, and the property workflows (equation of state, phonons, elastic
tensor) on the established libraries (ASE, phonopy)."""
