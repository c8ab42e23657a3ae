"""On-disk graph cache: graphs built once, in parallel processes, read back memory-mapped.

Layout of one cache (a directory named by the cache key)::

    <root>/<key>/meta.json                 cutoffs, source hash, format version, shard sizes
    <root>/<key>/shard-00000/<field>.npy   flat arrays of the shard's samples (np.load mmap_mode="r")
    <root>/<key>/shard-00000/ids.json      sample ids of the shard

Per shard, atoms, bonds and angles of all its samples are concatenated; ``*_ptr`` arrays
(n_samples + 1) give each sample's slice, with indices local to the sample. The key is a hash of
the cutoffs, the graph rules' version and the source's content hash, so a changed source or cutoff
never reads a stale cache. A reader (e.g. one DDP rank) opens the memory maps and touches only the
slices of the samples it asks for.

Safety:

* **Concurrent builds.** A build holds an exclusive lock (``<root>/<key>.lock``, ``flock``); a
  second process building the same cache waits for it and then opens the finished cache. Where
  the file system has no locks, both build, each shard into a private temporary folder renamed
  into place; the loser of a rename discards its copy and uses the winner's (same content).
* **Interrupted builds and full disks.** Shards and ``meta.json`` appear whole or not at all. A
  failed write removes its temporary files and raises OSError naming the file; the shards
  already written are kept and the next build resumes from them (when it uses the same options,
  recorded in ``build.json``).
* **Damage.** Opening a cache checks every file against ``meta.json`` (present, the shapes and
  dtypes expected, the size its header promises, pointers consistent) and raises
  :class:`DamagedCacheError` naming the cache folder and the file; delete the folder to rebuild.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from fastchgnet.data.graph import CrystalGraph, build_graph

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
GRAPH_RULES = 1  # bump when the graph construction changes what it produces

# per-sample arrays: name -> (dtype, trailing shape); "atom" fields are sliced by atom_ptr, etc.
_ATOM_FIELDS = {"atomic_numbers": (np.int16, ()), "positions": (np.float64, (3,)),
                "forces": (np.float32, (3,)), "magmom": (np.float32, ())}
_BOND_FIELDS = {"bond_src": (np.int32, ()), "bond_dst": (np.int32, ()),
                "bond_image": (np.int16, (3,)), "bond_length": (np.float32, ())}
_ANGLE_FIELDS = {"angle_center": (np.int32, ()), "angle_bond1": (np.int32, ()),
                 "angle_bond2": (np.int32, ()), "angle_sign1": (np.int8, ()),
                 "angle_sign2": (np.int8, ())}
_SAMPLE_FIELDS = {"lattice": (np.float64, (3, 3)), "energy": (np.float64, ()),
                  "stress": (np.float32, (3, 3)), "has": (np.bool_, (4,))}  # has: e, f, s, m
_PTRS = ("atom_ptr", "bond_ptr", "angle_ptr")
LABEL_KEYS = ("e", "f", "s", "m")  # the columns of "has", and the keys of meta["labels"]


class DamagedCacheError(ValueError):
    """A graph cache whose files do not match its ``meta.json`` (truncated, missing, altered)."""

    def __init__(self, path: Path, file: str, problem: str) -> None:
        super().__init__(f"graph cache {path} is damaged: {file}: {problem}. Delete the folder "
                         f"{path} to rebuild it (the dataset it was built from is not affected).")
        self.path, self.file = path, file


@dataclass
class CachedSample:
    """One sample read from the cache: its graph and labels (None where missing)."""

    graph: CrystalGraph
    energy_per_atom: float | None
    forces: np.ndarray | None
    stress: np.ndarray | None
    magmom: np.ndarray | None
    id: str


def file_hash(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file's content (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_key(source_hash: str, atom_cutoff: float, bond_cutoff: float) -> str:
    spec = json.dumps({"source": source_hash, "atom_cutoff": float(atom_cutoff),
                       "bond_cutoff": float(bond_cutoff), "rules": GRAPH_RULES,
                       "format": CACHE_FORMAT}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:24]


def _label_arrays(sample: Any, n: int) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    e = getattr(sample, "energy_per_atom", None)
    f = getattr(sample, "forces", None)
    s = getattr(sample, "stress", None)
    m = getattr(sample, "magmom", None)
    has = np.array([e is not None, f is not None, s is not None, m is not None])
    return (float(e) if e is not None else np.nan,
            np.zeros((n, 3)) if f is None else np.asarray(f, dtype=np.float64).reshape(n, 3),
            np.zeros((3, 3)) if s is None else np.asarray(s, dtype=np.float64).reshape(3, 3),
            np.zeros(n) if m is None else np.asarray(m, dtype=np.float64).reshape(n),
            has)


def _write_shard(args: tuple) -> tuple[int, int]:
    """Build the graphs of one chunk of samples and write them as a shard (runs in a worker)."""
    samples, out_dir, atom_cutoff, bond_cutoff, on_isolated, skip_bad = args
    out_dir = Path(out_dir)
    skipped: list[dict[str, str]] = []
    cols: dict[str, list[np.ndarray]] = {k: [] for k in
                                         (*_ATOM_FIELDS, *_BOND_FIELDS, *_ANGLE_FIELDS, *_SAMPLE_FIELDS)}
    counts = np.zeros((len(samples), 3), dtype=np.int64)  # trimmed to the kept samples below
    ids = []
    for smp in samples:
        sid = str(getattr(smp, "id", len(ids) + len(skipped)))
        try:
            g = build_graph(smp.structure, atom_cutoff=atom_cutoff, bond_cutoff=bond_cutoff,
                            graph_id=sid, on_isolated_atoms=on_isolated)
        except ValueError as exc:
            if not skip_bad:
                raise
            skipped.append({"id": sid, "reason": str(exc)})
            continue
        i = len(ids)
        e, f, s, m, has = _label_arrays(smp, g.n_atoms)
        cols["forces"].append(f)
        cols["magmom"].append(m)
        for name in ("atomic_numbers", "positions", *_BOND_FIELDS, *_ANGLE_FIELDS):
            cols[name].append(getattr(g, name))
        cols["lattice"].append(g.lattice[None])
        cols["energy"].append(np.array([e]))
        cols["stress"].append(s[None])
        cols["has"].append(has[None])
        counts[i] = (g.n_atoms, g.n_bonds, g.n_angles)
        ids.append(sid)
    counts = counts[: len(ids)]
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp"))
        for table in (_ATOM_FIELDS, _BOND_FIELDS, _ANGLE_FIELDS, _SAMPLE_FIELDS):
            for name, (dtype, shape) in table.items():
                arr = (np.concatenate(cols[name]) if cols[name] else np.zeros((0, *shape)))
                _save_npy(tmp / f"{name}.npy", arr.astype(dtype).reshape(-1, *shape))
        for k, name in enumerate(_PTRS):
            _save_npy(tmp / f"{name}.npy", np.concatenate([[0], np.cumsum(counts[:, k])]).astype(np.int64))
        (tmp / "ids.json").write_text(json.dumps(ids))
        (tmp / "skipped.json").write_text(json.dumps(skipped))
        _publish_dir(tmp, out_dir)  # a shard appears whole or not at all
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(out_dir, exc) from exc
    return len(samples), int(counts[:, 1].sum())


def _save_npy(path: Path, arr: np.ndarray) -> None:
    """``np.save`` through a Python file, so that a failed write raises OSError with the OS's
    errno (numpy's own writer reports a short write without one)."""
    arr = np.ascontiguousarray(arr)
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, np.lib.format.header_data_from_array_1_0(arr))
        fh.write(arr.reshape(-1).view(np.uint8))


def _publish_dir(tmp: Path, dst: Path) -> None:
    """Rename the finished folder ``tmp`` to ``dst``; if another process published ``dst`` first
    (a concurrent build of the same cache: same content), discard ``tmp`` and keep theirs."""
    try:
        os.replace(tmp, dst)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and (dst / "ids.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise


def _write_error(target: Path, exc: OSError) -> OSError:
    """OSError for a failed cache write: the file or shard, the OS reason, what is kept."""
    reason = f"{os.strerror(exc.errno)} [errno {exc.errno}]" if exc.errno else str(exc)
    msg = (f"could not write graph cache {target}: {reason}. Nothing was "
           f"lost: the partial files were removed, the shards already written are kept, and the "
           f"next build resumes from them (free space, or delete {target.parent} to start over).")
    return OSError(exc.errno, msg)


def build_cache(
    samples: Iterable[Any],
    root: str | os.PathLike,
    *,
    source_hash: str,
    atom_cutoff: float = 6.0,
    bond_cutoff: float = 3.0,
    shard_size: int = 2048,
    workers: int | None = None,
    on_isolated_atoms: str = "error",
    skip_bad: bool = False,
    progress: Callable[[int], None] | None = None,
    meta_extra: Callable[[], dict[str, Any]] | None = None,
) -> "GraphCache":
    """Build (or reuse) the cache of ``samples`` under ``root``; return it opened.

    ``samples`` yields objects with ``structure`` and optional labels ``energy_per_atom``,
    ``forces``, ``stress`` (GPa), ``magmom`` and an ``id`` (e.g. from
    :mod:`fastchgnet.data.readers`). Shards are built by ``workers`` processes (default: all CPUs);
    a shard already on disk (from an interrupted build with the same options) is kept. A structure
    that cannot be converted raises ValueError naming its id; with ``skip_bad=True`` it is left out
    instead and listed (id and reason) in :attr:`GraphCache.skipped`. ``meta_extra()``, called
    once all samples are consumed, adds entries to ``meta.json`` (e.g. the reader's skip
    statistics). Another process building the same cache is waited for (see the module's
    "Safety"); a failed write (a full disk) raises OSError naming the file, and loses nothing.
    """
    key = cache_key(source_hash, atom_cutoff, bond_cutoff)
    path = Path(root) / key
    if (path / "meta.json").is_file():
        return GraphCache(path)
    Path(root).mkdir(parents=True, exist_ok=True)
    with _build_lock(Path(root) / f"{key}.lock", path) as locked:
        if (path / "meta.json").is_file():  # built by another process while we waited
            return GraphCache(path)
        return _build_locked(samples, path, locked, source_hash=source_hash,
                             atom_cutoff=atom_cutoff, bond_cutoff=bond_cutoff,
                             shard_size=shard_size, workers=workers,
                             on_isolated_atoms=on_isolated_atoms, skip_bad=skip_bad,
                             progress=progress, meta_extra=meta_extra)


@contextlib.contextmanager
def _build_lock(lock_file: Path, path: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``lock_file`` (waiting for another builder); yields whether
    the lock is held (False where the file system or platform has no locks)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: builds are still safe (private temp folders), not exclusive
        yield False
        return
    with open(lock_file, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("graph cache %s is being built by another process: waiting for it", path)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except OSError as exc:  # e.g. a network file system without flock
            log.debug("no lock for %s (%s): building without one", lock_file, exc)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _build_locked(samples: Iterable[Any], path: Path, locked: bool, *, source_hash: str,
                  atom_cutoff: float, bond_cutoff: float, shard_size: int, workers: int | None,
                  on_isolated_atoms: str, skip_bad: bool, progress: Callable[[int], None] | None,
                  meta_extra: Callable[[], dict[str, Any]] | None) -> "GraphCache":
    path.mkdir(parents=True, exist_ok=True)
    # the options that decide the shards' content: an interrupted build is resumed only with the
    # same ones (shards cut at another size, or with other rules, would give a wrong cache)
    options = {"source_hash": source_hash, "atom_cutoff": float(atom_cutoff),
               "bond_cutoff": float(bond_cutoff), "shard_size": int(shard_size),
               "on_isolated_atoms": on_isolated_atoms, "skip_bad": bool(skip_bad)}
    build_file = path / "build.json"
    try:
        previous = json.loads(build_file.read_text()) if build_file.is_file() else None
    except ValueError:
        previous = {}
    if locked:
        for stale in path.glob("*.tmp*"):  # partial writes of a build that was killed
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
        if previous is not None and previous != options:
            log.warning("graph cache %s: discarding the shards of an interrupted build with other "
                        "options (%s)", path, previous)
            for old in path.glob("shard-*"):
                shutil.rmtree(old, ignore_errors=True)
    if previous != options:
        _write_json_atomic(build_file, options)
    workers = workers or os.cpu_count() or 1

    def jobs() -> Iterable[tuple]:
        chunk: list[Any] = []
        k = 0
        for smp in samples:
            chunk.append(smp)
            if len(chunk) >= shard_size:
                yield (chunk, str(path / f"shard-{k:05d}"), atom_cutoff, bond_cutoff,
                       on_isolated_atoms, skip_bad)
                chunk, k = [], k + 1
        if chunk or k == 0:
            yield (chunk, str(path / f"shard-{k:05d}"), atom_cutoff, bond_cutoff, on_isolated_atoms,
                   skip_bad)

    n_shards = 0
    todo = []
    if workers > 1:
        # at most 2 shards per worker in flight: memory stays bounded for a streamed source
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for job in jobs():
                n_shards += 1
                if Path(job[1]).is_dir():  # kept from an interrupted build
                    continue
                todo.append(pool.submit(_write_shard, job))
                while len(todo) >= 2 * workers:
                    done, pending = wait(todo, return_when=FIRST_COMPLETED)
                    for fut in done:
                        n, _ = fut.result()
                        if progress:
                            progress(n)
                    todo = list(pending)
            for fut in todo:
                n, _ = fut.result()
                if progress:
                    progress(n)
    else:
        for job in jobs():
            n_shards += 1
            if Path(job[1]).is_dir():
                continue
            n, _ = _write_shard(job)
            if progress:
                progress(n)
    sizes = [len(json.loads((path / f"shard-{i:05d}" / "ids.json").read_text()))
             for i in range(n_shards)]
    skipped = []
    for i in range(n_shards):
        f = path / f"shard-{i:05d}" / "skipped.json"
        if f.is_file():
            skipped.extend(json.loads(f.read_text()))
    has = np.zeros(4, dtype=np.int64)
    for i in range(n_shards):
        has += np.asarray(np.load(path / f"shard-{i:05d}" / "has.npy"), dtype=np.int64).reshape(-1, 4).sum(0)
    meta = {"format": CACHE_FORMAT, "rules": GRAPH_RULES, "source_hash": source_hash,
            "atom_cutoff": float(atom_cutoff), "bond_cutoff": float(bond_cutoff),
            "shard_sizes": sizes, "n_samples": int(sum(sizes)),
            "labels": {k: int(v) for k, v in zip(LABEL_KEYS, has)}, "skipped": skipped,
            **(meta_extra() if meta_extra else {})}
    _write_json_atomic(path / "meta.json", meta)
    return GraphCache(path)


def _write_json_atomic(target: Path, obj: Any) -> None:
    """Write JSON to a private temporary file, flush it, rename it over ``target``."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(obj, indent=1))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise _write_error(target, exc) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


class GraphCache:
    """Random access to a built cache; arrays are memory-mapped and read lazily per sample.

    Opening checks the files against ``meta.json`` and raises :class:`DamagedCacheError` (naming
    the folder and the file) for a missing, truncated or inconsistent one.

    ``meta`` (the parsed ``meta.json``) holds:

    ============== ============================================================================
    key            value
    ============== ============================================================================
    format, rules  cache format and graph-rules versions
    source_hash    content hash of the source (and reader options)
    atom_cutoff,   graph cutoffs (Å)
    bond_cutoff
    shard_sizes    samples per shard
    n_samples      samples in the cache (the frames that a trainer sees)
    labels         ``{"e": n, "f": n, "s": n, "m": n}``: samples carrying an energy, forces,
                   stress and magnetic moments (out of ``n_samples``); a label with 0, e.g. a
                   misspelled stress key, was missing from every frame. Also
                   :meth:`label_counts` (which computes it for caches older than this key).
    skipped        ``[{"id", "reason"}]``: samples left out by the graph rules (``skip_bad``)
    reader         (when built by ``fastchgnet train``) the reader's statistics: ``read``,
                   ``skipped``, ``reasons``, ``examples``, ``missing`` (per label)
    source         (idem) the dataset file
    ============== ============================================================================
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{self.path} is not a fastchgnet graph cache (no meta.json)")
        try:
            self.meta = json.loads(meta_file.read_text())
            if not isinstance(self.meta, dict):
                raise ValueError(f"a {type(self.meta).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise DamagedCacheError(self.path, "meta.json", f"not valid JSON ({exc})") from None
        if self.meta.get("format") != CACHE_FORMAT or self.meta.get("rules") != GRAPH_RULES:
            raise ValueError(f"{self.path}: cache format/rules {self.meta.get('format')}/"
                             f"{self.meta.get('rules')} differ from {CACHE_FORMAT}/{GRAPH_RULES}; rebuild it")
        for k in ("shard_sizes", "atom_cutoff", "bond_cutoff"):
            if k not in self.meta:
                raise DamagedCacheError(self.path, "meta.json", f"no {k!r} entry")
        self.shard_sizes = [int(n) for n in self.meta["shard_sizes"]]
        self._starts = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)
        self._shards: dict[int, dict[str, Any]] = {}
        for k, n in enumerate(self.shard_sizes):
            self._check_shard(k, n)

    def _check_shard(self, k: int, n: int) -> None:
        """Every file of shard ``k`` is there, with the shape, dtype and size ``meta`` implies."""
        d = f"shard-{k:05d}"
        if not (self.path / d).is_dir():
            raise DamagedCacheError(self.path, d, "the shard folder is missing")
        if not (self.path / d / "ids.json").is_file():
            raise DamagedCacheError(self.path, f"{d}/ids.json", "missing")
        totals = {}
        for name in _PTRS:
            ptr = self._npy(d, name, np.int64, (n + 1,))
            if ptr[0] != 0 or np.any(np.diff(ptr) < 0):
                raise DamagedCacheError(self.path, f"{d}/{name}.npy", "pointers not increasing from 0")
            totals[name] = int(ptr[-1])
        for table, count in ((_ATOM_FIELDS, totals["atom_ptr"]), (_BOND_FIELDS, totals["bond_ptr"]),
                             (_ANGLE_FIELDS, totals["angle_ptr"]), (_SAMPLE_FIELDS, n)):
            for name, (dtype, shape) in table.items():
                self._npy(d, name, dtype, (count, *shape), load=False)

    def _npy(self, d: str, name: str, dtype: Any, shape: tuple, load: bool = True) -> Any:
        """Check one ``.npy`` file's header against ``dtype``/``shape`` and its size against the
        header; return its (memory-mapped) array when ``load``."""
        rel = f"{d}/{name}.npy"
        f = self.path / rel
        try:
            with open(f, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                got_shape, _, got_dtype = read(fh)
                offset = fh.tell()
        except FileNotFoundError:
            raise DamagedCacheError(self.path, rel, "missing") from None
        except (ValueError, OSError, EOFError) as exc:
            raise DamagedCacheError(self.path, rel, f"not a readable .npy file ({exc})") from None
        if tuple(got_shape) != tuple(shape) or np.dtype(got_dtype) != np.dtype(dtype):
            raise DamagedCacheError(self.path, rel, f"holds {np.dtype(got_dtype)} {tuple(got_shape)}, "
                                    f"expected {np.dtype(dtype)} {tuple(shape)} from meta.json")
        want = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        size = f.stat().st_size
        if size != want:
            what = "truncated" if size < want else "longer than its header says"
            raise DamagedCacheError(self.path, rel, f"{what} ({size} bytes, expected {want})")
        return np.load(f, mmap_mode="r") if load else None

    def label_counts(self) -> dict[str, int]:
        """Samples carrying each label: ``{"e": n, "f": n, "s": n, "m": n}`` (out of ``len(self)``);
        ``meta["labels"]``, or computed from the shards for a cache built before that key."""
        if isinstance(self.meta.get("labels"), dict):
            return {k: int(self.meta["labels"].get(k, 0)) for k in LABEL_KEYS}
        has = np.zeros(4, dtype=np.int64)
        for k in range(len(self.shard_sizes)):
            has += np.asarray(self._shard(k)["has"], dtype=np.int64).reshape(-1, 4).sum(0)
        return {k: int(v) for k, v in zip(LABEL_KEYS, has)}

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def skipped(self) -> list[dict[str, str]]:
        """Samples left out when the cache was built with ``skip_bad=True``: id and reason."""
        return list(self.meta.get("skipped", []))

    @property
    def ids(self) -> list[str]:
        """The id of every sample, in order."""
        return [sid for k in range(len(self.shard_sizes)) for sid in self._shard(k)["ids"]]

    @property
    def atom_cutoff(self) -> float:
        return float(self.meta["atom_cutoff"])

    @property
    def bond_cutoff(self) -> float:
        return float(self.meta["bond_cutoff"])

    def _shard(self, k: int) -> dict[str, Any]:
        if k not in self._shards:
            d = self.path / f"shard-{k:05d}"
            names = (*_ATOM_FIELDS, *_BOND_FIELDS, *_ANGLE_FIELDS, *_SAMPLE_FIELDS, *_PTRS)
            try:
                arrays: dict[str, Any] = {n: np.load(d / f"{n}.npy", mmap_mode="r") for n in names}
            except (OSError, ValueError) as exc:  # changed since the cache was opened
                raise DamagedCacheError(self.path, d.name, f"cannot be read ({exc})") from None
            try:
                ids = json.loads((d / "ids.json").read_text())
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                raise DamagedCacheError(self.path, f"{d.name}/ids.json", f"not valid JSON ({exc})") from None
            if not isinstance(ids, list) or len(ids) != self.shard_sizes[k]:
                got = len(ids) if isinstance(ids, list) else type(ids).__name__
                raise DamagedCacheError(self.path, f"{d.name}/ids.json",
                                        f"{got} ids, expected {self.shard_sizes[k]} from meta.json")
            arrays["ids"] = ids
            self._shards[k] = arrays
        return self._shards[k]

    def _locate(self, index: int) -> tuple[dict[str, Any], int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for a cache of {len(self)}")
        index %= len(self)
        k = int(np.searchsorted(self._starts, index, side="right") - 1)
        return self._shard(k), index - int(self._starts[k])

    def sizes(self) -> np.ndarray:
        """(n_samples, 3) atoms, directed bonds and angles of every sample (reads only the ptrs)."""
        out = []
        for k in range(len(self.shard_sizes)):
            d = self.path / f"shard-{k:05d}"
            ptr = [np.load(d / f"{n}.npy", mmap_mode="r") for n in ("atom_ptr", "bond_ptr", "angle_ptr")]
            out.append(np.stack([np.diff(p) for p in ptr], axis=1))
        sizes = np.concatenate(out) if out else np.zeros((0, 3), dtype=np.int64)
        sizes[:, 1] *= 2  # directed bonds
        return sizes

    def composition_counts(self, max_z: int = 94) -> np.ndarray:
        """(n_samples, max_z) number of atoms of each element (column ``Z - 1``) in every sample."""
        out = []
        for k in range(len(self.shard_sizes)):
            sh = self._shard(k)
            n = len(sh["ids"])
            counts = np.zeros((n, max_z), dtype=np.int64)
            owner = np.repeat(np.arange(n), np.diff(sh["atom_ptr"]))
            z = np.asarray(sh["atomic_numbers"], dtype=np.int64)
            if len(z) and (z.min() < 1 or z.max() > max_z):
                raise ValueError(f"{self.path}: atomic numbers outside 1..{max_z}")
            np.add.at(counts, (owner, z - 1), 1)
            out.append(counts)
        return np.concatenate(out) if out else np.zeros((0, max_z), dtype=np.int64)

    def energies(self) -> np.ndarray:
        """(n_samples,) energy labels in eV/atom, NaN where a sample has none."""
        out = []
        for k in range(len(self.shard_sizes)):
            sh = self._shard(k)
            e = np.asarray(sh["energy"], dtype=np.float64).copy()
            e[~np.asarray(sh["has"])[:, 0]] = np.nan
            out.append(e)
        return np.concatenate(out) if out else np.zeros(0)

    def __getitem__(self, index: int) -> CachedSample:
        sh, i = self._locate(index)
        a0, a1 = int(sh["atom_ptr"][i]), int(sh["atom_ptr"][i + 1])
        b0, b1 = int(sh["bond_ptr"][i]), int(sh["bond_ptr"][i + 1])
        g0, g1 = int(sh["angle_ptr"][i]), int(sh["angle_ptr"][i + 1])
        graph = CrystalGraph(
            atomic_numbers=np.asarray(sh["atomic_numbers"][a0:a1], dtype=np.int64),
            positions=np.array(sh["positions"][a0:a1]),
            lattice=np.array(sh["lattice"][i]),
            bond_src=np.asarray(sh["bond_src"][b0:b1], dtype=np.int64),
            bond_dst=np.asarray(sh["bond_dst"][b0:b1], dtype=np.int64),
            bond_image=np.asarray(sh["bond_image"][b0:b1], dtype=np.int64),
            bond_length=np.asarray(sh["bond_length"][b0:b1], dtype=np.float64),
            angle_center=np.asarray(sh["angle_center"][g0:g1], dtype=np.int64),
            angle_bond1=np.asarray(sh["angle_bond1"][g0:g1], dtype=np.int64),
            angle_bond2=np.asarray(sh["angle_bond2"][g0:g1], dtype=np.int64),
            angle_sign1=np.array(sh["angle_sign1"][g0:g1]),
            angle_sign2=np.array(sh["angle_sign2"][g0:g1]),
            atom_cutoff=self.atom_cutoff, bond_cutoff=self.bond_cutoff,
            graph_id=sh["ids"][i],
        )
        has = np.asarray(sh["has"][i])
        return CachedSample(
            graph=graph,
            energy_per_atom=float(sh["energy"][i]) if has[0] else None,
            forces=np.array(sh["forces"][a0:a1], dtype=np.float64) if has[1] else None,
            stress=np.array(sh["stress"][i], dtype=np.float64) if has[2] else None,
            magmom=np.array(sh["magmom"][a0:a1], dtype=np.float64) if has[3] else None,
            id=sh["ids"][i],
        )

    def remove(self) -> None:
        """Delete this cache from disk."""
        shutil.rmtree(self.path)


def open_or_build(samples_fn: Callable[[], Iterable[Any]], source: str | os.PathLike,
                  root: str | os.PathLike, options: dict[str, Any] | None = None,
                  **kwargs: Any) -> GraphCache:
    """Cache of a dataset file: keyed by the file's content hash and ``options`` (everything else
    that changes the samples, e.g. the reader's key names and units, JSON-serialisable);
    ``samples_fn()`` is called only when the cache has to be built."""
    h = file_hash(source)
    if options:
        spec = json.dumps({"file": h, "options": options}, sort_keys=True, default=str)
        h = hashlib.sha256(spec.encode()).hexdigest()
    if kwargs.get("skip_bad"):
        h = hashlib.sha256((h + ":skip_bad").encode()).hexdigest()
    key = cache_key(h, kwargs.get("atom_cutoff", 6.0), kwargs.get("bond_cutoff", 3.0))
    if (Path(root) / key / "meta.json").is_file():
        return GraphCache(Path(root) / key)
    return build_cache(samples_fn(), root, source_hash=h, **kwargs)


def subset_sizes(cache: GraphCache, indices: Sequence[int]) -> np.ndarray:
    """Sizes (atoms, directed bonds, angles) of selected samples."""
    return cache.sizes()[np.asarray(indices, dtype=np.int64)]
