"""Regenerate ``fastchgnet/assets/mlearn/`` (the bundled mlearn DFT sets) from the mlearn JSON files.

    python scripts/bundle_mlearn.py [--src ../shared/data/mlearn] [--dst fastchgnet/assets/mlearn]

For every ``<El>/training.json`` and ``<El>/test.json`` under ``--src`` it writes
``<El>-training.json.gz`` / ``<El>-test.json.gz``: the same mlearn JSON list, frame by frame and key by
key, except that each structure dict keeps only what ``Structure.from_dict`` reads: the lattice
``matrix`` and each site's ``species``, ``abc`` (and ``properties`` when not empty). Dropped are the
values pymatgen derives from those (site ``xyz`` and ``label``, the lattice's a, b, c, angles and
volume). Numbers are written by Python's ``repr`` (exact float round trip); gzip level 9 with a
zero time stamp and no file name, so the bytes depend only on the input.

After writing, every file is read back with :func:`fastchgnet.data.readers.read_mlearn` and compared
with the original, sample by sample: species, lattice, fractional coordinates, energy, forces,
stress and metadata must be bit-identical (the script fails otherwise). ``manifest.json`` records
each file's frames and atoms and the original file's size and SHA-256. The licence is copied
verbatim to ``LICENSE``; ``README.md`` (provenance) is written by hand and left alone.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT.parent / "shared" / "data" / "mlearn"
DST = ROOT / "fastchgnet" / "assets" / "mlearn"
SPLITS = ("training", "test")


def slim_structure(d: dict) -> dict:
    """The keys of a pymatgen Structure dict that ``Structure.from_dict`` reads."""
    out = {k: d[k] for k in ("@module", "@class", "charge") if k in d}
    if d.get("properties"):
        out["properties"] = d["properties"]
    out["lattice"] = {"matrix": d["lattice"]["matrix"]}
    sites = []
    for s in d["sites"]:
        site = {"species": s["species"], "abc": s["abc"]}
        if s.get("properties"):
            site["properties"] = s["properties"]
        sites.append(site)
    out["sites"] = sites
    return out


def encode(frames: list) -> bytes:
    """The slim JSON of a list of mlearn frames, gzip-compressed deterministically."""
    slim = [{k: (slim_structure(v) if k == "structure" else v) for k, v in fr.items()}
            for fr in frames]
    text = json.dumps(slim, separators=(",", ":")).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(text)
    return buf.getvalue()


def check_same(original: Path, bundled: Path) -> int:
    """Read both with the project's reader; fail unless every sample is identical. Returns the count."""
    from fastchgnet.data.readers import read_mlearn

    n = 0
    for a, b in zip(read_mlearn(original), read_mlearn(bundled), strict=True):
        sa, sb = a.structure, b.structure
        same = ([str(x) for x in sa.species] == [str(x) for x in sb.species]
                and np.array_equal(sa.lattice.matrix, sb.lattice.matrix)
                and np.array_equal(sa.frac_coords, sb.frac_coords)
                and a.energy_per_atom == b.energy_per_atom and a.info == b.info
                and all(_same_array(getattr(a, k), getattr(b, k)) for k in ("forces", "stress", "magmom")))
        if not same:
            raise SystemExit(f"{bundled}: frame {n} differs from {original}")
        n += 1
    return n


def _same_array(x: np.ndarray | None, y: np.ndarray | None) -> bool:
    return (x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=SRC, help=f"mlearn folder [{SRC}]")
    ap.add_argument("--dst", type=Path, default=DST, help=f"bundle folder [{DST}]")
    args = ap.parse_args(argv)
    if not (args.src / "LICENSE").is_file():
        print(f"{args.src}: no mlearn data (LICENSE missing)", file=sys.stderr)
        return 1
    args.dst.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"source": "https://github.com/materialsvirtuallab/mlearn (data/<El>/*.json)",
                      "encoding": "slim mlearn JSON, gzip -9 (scripts/bundle_mlearn.py)", "files": {}}
    for el_dir in sorted(p for p in args.src.iterdir() if p.is_dir()):
        for split in SPLITS:
            src = el_dir / f"{split}.json"
            if not src.is_file():
                continue
            raw = src.read_bytes()
            frames = json.loads(raw)
            dst = args.dst / f"{el_dir.name}-{split}.json.gz"
            tmp = dst.with_suffix(".gz.tmp")
            tmp.write_bytes(encode(frames))
            tmp.replace(dst)
            n = check_same(src, dst)
            manifest["files"][dst.name] = {
                "element": el_dir.name, "split": split, "frames": n,
                "atoms": int(sum(len(f["structure"]["sites"]) for f in frames)),
                "groups": sorted({f.get("group", "") for f in frames}),
                "bytes": dst.stat().st_size, "original_bytes": len(raw),
                "original_sha256": hashlib.sha256(raw).hexdigest()}
            print(f"{dst.name}: {n} frames, {len(raw):,} -> {dst.stat().st_size:,} bytes")
    shutil.copyfile(args.src / "LICENSE", args.dst / "LICENSE")
    (args.dst / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in args.dst.iterdir() if p.is_file())
    print(f"{args.dst}: {total:,} bytes in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
