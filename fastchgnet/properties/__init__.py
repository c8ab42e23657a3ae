"""What a CHGNet user computes on top of energies and forces: the Hessian, atomic charges from
magnetic moments, D3 dispersion, and the property workflows (equation of state, phonons, elastic
tensor) on the established libraries (ASE, phonopy). See docs/properties.md.

``hessian`` and ``phonons`` are both a function and the module holding it: import them from
their modules (``from fastchgnet.properties.hessian import hessian``). The other names are
re-exported here and imported on first use, so ``import fastchgnet.properties`` loads neither ASE's
optimisers, phonopy nor tad-dftd3.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "hessian_of_model": "hessian", "gamma_frequencies": "hessian",
    "charges_from_magmoms": "charges", "oxidation_states": "charges",
    "d3_energy": "dispersion", "d3_parameters": "dispersion", "D3Calculator": "dispersion",
    "with_dispersion": "dispersion",
    "equation_of_state": "eos", "EOSResult": "eos",
    "PhononResult": "phonons",
    "elastic_tensor": "elastic", "ElasticResult": "elastic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastchgnet.properties' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fastchgnet.properties.{module}"), name)
    globals()[name] = value
    return value
