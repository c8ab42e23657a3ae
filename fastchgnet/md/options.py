"""Keyword checks of the ASE-side API: an unknown keyword is a ``TypeError``, never a silent no-op.

ASE's ``Calculator`` keeps unknown keywords in ``calc.parameters`` and its optimisers pass them
down to an internal base class, so a misspelt or foreign option (``use_device="cpu"`` from a
chgnet script) would either do nothing or fail deep inside ASE. The classes of
:mod:`fastchgnet.md` check their keywords here first. A keyword that is chgnet's name for one of
ours gets a message naming the fastchgnet equivalent, and every message points at
:mod:`fastchgnet.compat.chgnet`, which takes chgnet's names and defaults unchanged.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable

__all__ = ["ASE_CALCULATOR_KEYWORDS", "CHGNET_EQUIVALENTS", "check_keywords",
           "check_optimizer_keywords"]

#: the named arguments of ``ase.calculators.calculator.Calculator.__init__``
ASE_CALCULATOR_KEYWORDS = ("restart", "ignore_bad_restart_file", "label", "atoms", "directory")

#: chgnet keyword -> what fastchgnet's own API calls it (or does instead)
CHGNET_EQUIVALENTS: dict[str, str] = {
    "use_device": "fastchgnet calls this device=",
    "check_cuda_mem": "fastchgnet calls this device= (pass device='cuda:N')",
    "stress_weight": ("fastchgnet's calculator always gives the stress in eV/Å^3 (ASE units); "
                      "fastchgnet.compat.chgnet's CHGNetCalculator takes stress_weight="),
    "return_site_energies": "fastchgnet always puts per-site energies in calc.results['energies']",
    "optimizer_class": "fastchgnet calls this optimizer=",
    "ase_filter": "fastchgnet calls this cell_filter=",
    "save_path": ("fastchgnet writes the trajectory with trajectory= (ASE .traj or extxyz, every "
                  "loginterval steps) and a text log with logfile=; the in-memory record is "
                  "result.trajectory"),
    "crystal_feas_save_path": ("fastchgnet's relax does not record crystal features; "
                               "fastchgnet.compat.chgnet's StructOptimizer.relax does"),
    "assign_magmoms": ("fastchgnet always assigns magmoms: result.final_structure has a 'magmom' "
                       "site property"),
    "crystal_feas_logfile": ("fastchgnet's MolecularDynamics does not record crystal features; "
                             "fastchgnet.compat.chgnet's MolecularDynamics does"),
    "append_trajectory": "fastchgnet calls this append=",
    "model_name": "fastchgnet calls this model= (e.g. model='0.3.0')",
}

_COMPAT_NOTE = ("(a script written for chgnet runs unchanged with `from fastchgnet.compat.chgnet"
                ".model import ...`)")


def check_keywords(where: str, kwargs: dict[str, Any], allowed: Iterable[str] = (),
                   hints: bool = True) -> None:
    """TypeError unless every key of ``kwargs`` is in ``allowed``; with ``hints``, chgnet's names
    get a message naming the fastchgnet equivalent.

    ``where`` names the callable in the message (e.g. ``"CHGNetCalculator"``).
    """
    allowed = set(allowed)
    bad = [k for k in kwargs if k not in allowed]
    if not bad:
        return
    if not hints:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {bad}")
    parts = [f"{k}: {CHGNET_EQUIVALENTS[k]}" if k in CHGNET_EQUIVALENTS else f"{k}: unknown"
             for k in bad]
    raise TypeError(f"{where}() got unexpected keyword argument(s) {bad}: " + "; ".join(parts)
                    + (f" {_COMPAT_NOTE}" if any(k in CHGNET_EQUIVALENTS for k in bad) else ""))


def optimizer_keywords(cls: Any) -> tuple[set[str], bool]:
    """The keyword names an ASE optimiser class accepts (through its base classes' ``__init__``
    as long as each passes ``**kwargs`` on), and whether some ``__init__`` swallows any keyword
    without passing it on."""
    names: set[str] = set()
    for klass in getattr(cls, "__mro__", (cls,)):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:
            break
        try:
            params = inspect.signature(init).parameters
        except (TypeError, ValueError):
            return names, True
        names |= {n for n, p in params.items()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return names, False
    return names, False


def check_optimizer_keywords(where: str, cls: Any, kwargs: dict[str, Any],
                             reserved: Iterable[str] = (), hints: bool = True) -> None:
    """TypeError for keywords the optimiser ``cls`` does not take (or that ``where`` sets itself:
    ``reserved``), with chgnet's names explained; checked before any work is done."""
    if not kwargs:
        return
    names, open_ended = optimizer_keywords(cls)
    names -= {"atoms", *reserved}
    if open_ended:
        names |= {k for k in kwargs if k not in CHGNET_EQUIVALENTS and k not in set(reserved)}
    try:
        check_keywords(where, kwargs, names, hints)
    except TypeError as exc:
        raise TypeError(f"{exc} [keywords other than {where}'s own go to the optimiser "
                        f"{getattr(cls, '__name__', cls)}, which takes {sorted(names)}]") from None
