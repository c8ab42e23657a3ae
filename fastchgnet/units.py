"""Unit constants, in one place (the reference's values where it has one).

Conventions: energies eV (eV/atom from the model), lengths Å, forces eV/Å, stress GPa with
positive = tensile, magnetic moments μB, time fs, masses amu, temperature K.
"""

from __future__ import annotations

EV_A3_TO_GPA = 160.21766208  # 1 eV/Å^3 in GPa (CODATA 2014 e; the value CHGNet uses)
EV_PER_A3_TO_GPA = EV_A3_TO_GPA  # the readers' older name of the same constant
KBAR_TO_GPA = 0.1
# VASP / MPtrj / mlearn stress: kBar, positive = compressive -> GPa, positive = tensile
VASP_KBAR_TO_GPA = -KBAR_TO_GPA
KB_EV = 8.617333262e-5  # Boltzmann constant, eV/K (CODATA 2018)
# 1 amu Å^2/fs^2 in eV: converts m v^2 (amu, Å/fs) to eV and F/m (eV/Å/amu) to Å/fs^2
AMU_A2_FS2_EV = 103.64269572045424  # amu · 1e10 / e (CODATA 2018, as ASE)

__all__ = ["AMU_A2_FS2_EV", "EV_A3_TO_GPA", "EV_PER_A3_TO_GPA", "KBAR_TO_GPA", "KB_EV",
           "VASP_KBAR_TO_GPA"]
