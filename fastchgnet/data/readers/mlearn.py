"""mlearn JSON (a list of frames), streamed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

from fastchgnet.data.readers.common import (MLEARN_VOIGT_PAIRS, BadEntry, Sample, _guarded, _is_missing,
                                            _require, _stress33, _structure_from_dict, make_sample)
from fastchgnet.data.readers.json_stream import DEFAULT_CHUNK_SIZE, _open_text, iter_json_top_level
from fastchgnet.units import VASP_KBAR_TO_GPA

def _mlearn_sample(frame: Any, index: int, name: str, source: str) -> Sample:
    if not isinstance(frame, dict):
        raise BadEntry("bad value", f"frame is a {type(frame).__name__}, expected a dict")
    structure = _structure_from_dict(_require(frame, "structure"))
    outputs = _require(frame, "outputs")
    if not isinstance(outputs, dict):
        raise BadEntry("bad value", "'outputs' is not an object")
    energy = _require(outputs, "energy")
    if energy is None:
        raise BadEntry("missing key", "outputs.energy is null")
    n_label = frame.get("num_atoms")
    if n_label is not None and n_label != len(structure):
        raise BadEntry("bad shape", f"num_atoms is {n_label} but the structure has "
                       f"{len(structure)} sites")
    virial = outputs.get("virial_stress")
    stress = None
    if not _is_missing(virial):
        stress = VASP_KBAR_TO_GPA * _stress33(virial, "virial_stress", MLEARN_VOIGT_PAIRS)
    info = {k: frame[k] for k in ("group", "description", "tag") if k in frame}
    return make_sample(structure, energy_total=energy, forces=outputs.get("forces"),
                       stress_gpa=stress, id=f"{name}:{index}", source=source, info=info)


def read_mlearn(
    path: str | os.PathLike,
    *,
    skip_bad: bool = False,
    stats: dict | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[Sample]:
    """Stream the frames of an mlearn JSON list.

    Each frame: ``{"structure": <pymatgen dict>, "num_atoms", "group", "outputs": {"energy"
    (total eV), "forces" (n, 3) eV/Å, "virial_stress" (6 numbers, kBar, VASP sign, order xx, yy,
    zz, xy, yz, zx)}}``. Energy per atom = energy / n_atoms; stress = −0.1 × virial (GPa,
    positive = tensile). No magnetic moments. Sample ids are ``"<file name>:<list index>"``;
    ``Sample.info`` keeps ``group``, ``description`` and ``tag``.
    """
    source = str(path)
    name = Path(path).name

    def entries() -> Iterator[tuple[str, Callable[[], Sample]]]:
        with _open_text(path) as fh:
            for index, frame in iter_json_top_level(fh, source=source, chunk_size=chunk_size):
                yield str(index), (lambda f=frame, i=index: _mlearn_sample(f, i, name, source))

    return _guarded(source, entries(), skip_bad, stats)


__all__ = ["read_mlearn"]
