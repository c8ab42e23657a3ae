"""MPtrj JSON (``{mp_id: {frame_id: frame}}``, optionally gzip-compressed), streamed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

from fastchgnet.data.readers.common import (BadEntry, Sample, _floats, _guarded, _is_missing, _require,
                                            _structure_from_dict, make_sample)
from fastchgnet.data.readers.json_stream import DEFAULT_CHUNK_SIZE, _open_text, iter_json_top_level
from fastchgnet.units import VASP_KBAR_TO_GPA

def _mptrj_sample(frame: Any, mp_id: str, frame_id: str, name: str, source: str) -> Sample:
    if not isinstance(frame, dict):
        raise BadEntry("bad value", f"frame is a {type(frame).__name__}, expected a dict")
    structure = _structure_from_dict(_require(frame, "structure"))
    e_pa = frame.get("energy_per_atom")
    e_tot = frame.get("corrected_total_energy")
    if e_pa is None and e_tot is None:
        raise BadEntry("missing key", "missing key 'energy_per_atom' (and no 'corrected_total_energy')")
    stress = frame.get("stress")
    if not _is_missing(stress):
        s = _floats(stress, "stress")
        if s.shape != (3, 3):
            raise BadEntry("bad shape", f"stress has shape {s.shape}, expected (3, 3)")
        stress = VASP_KBAR_TO_GPA * s
    return make_sample(
        structure, energy_per_atom=e_pa, energy_total=e_tot, forces=frame.get("force"),
        stress_gpa=stress, magmom=frame.get("magmom"), id=f"{name}:{mp_id}/{frame_id}",
        source=source, info={"mp_id": mp_id, "frame_id": frame_id},
    )


def read_mptrj(
    path: str | os.PathLike,
    *,
    skip_bad: bool = False,
    stats: dict | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[Sample]:
    """Stream the frames of an MPtrj JSON file (``.json`` or ``.json.gz``).

    Layout: ``{mp_id: {frame_id: {"structure": <pymatgen dict>, "energy_per_atom" (eV/atom),
    "corrected_total_energy" (eV), "force" (n, 3) eV/Å, "stress" (3, 3) kBar VASP sign,
    "magmom" (n,) μB or None, ...}}}``. The file is read ``chunk_size`` characters at a time and
    decoded one mp_id at a time: the 12 GB MPtrj file is never held in memory.

    Energy: ``energy_per_atom``, else ``corrected_total_energy`` / n_atoms. Stress: −0.1 × kBar
    (GPa, positive = tensile). Magnetic moments: magnitudes. ``force``, ``stress`` or ``magmom``
    that is null (or an empty list) is a missing label. Sample ids are
    ``"<file name>:<mp_id>/<frame_id>"``.
    """
    source = str(path)
    name = Path(path).name

    def entries() -> Iterator[tuple[str, Callable[[], Sample]]]:
        with _open_text(path) as fh:
            for mp_id, frames in iter_json_top_level(fh, source=source, chunk_size=chunk_size):
                if not isinstance(frames, dict):
                    def bad(frames: Any = frames) -> Sample:
                        raise BadEntry("bad value", f"value is a {type(frames).__name__}, "
                                       "expected an object of frames")
                    yield str(mp_id), bad
                    continue
                for frame_id, frame in frames.items():
                    yield f"{mp_id}/{frame_id}", (
                        lambda f=frame, m=mp_id, k=frame_id: _mptrj_sample(f, m, k, name, source))

    return _guarded(source, entries(), skip_bad, stats)


__all__ = ["read_mptrj"]
