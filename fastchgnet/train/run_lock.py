"""The lock of a run folder: one training run owns ``--out`` at a time.

:func:`~fastchgnet.train.train` takes the lock before it reads or writes anything in the folder
and releases it at the end, also when the run fails. The lock is a file ``run.lock`` created with
``O_CREAT | O_EXCL`` (atomic: of two runs starting together exactly one creates it) that holds
its owner: process id, host name, the process's start time (Linux: from ``/proc``, so a
recycled process id is not mistaken for the owner), the time and the command line.

A second run on the same folder fails at once with :class:`RunFolderLockedError` naming the folder
and the owner. A lock left by a process that no longer exists on this host (a run killed with
SIGKILL, a machine that rebooted) is *stale*: the next run takes it over and logs it. A lock of
another host cannot be checked from here and is never taken over: the error says to delete the
file when that run is known to be gone. Under DDP only rank 0 locks.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["LOCK_NAME", "RunFolderLockedError", "RunLock"]

LOCK_NAME = "run.lock"


class RunFolderLockedError(FileExistsError):
    """Another run (alive, or on another host) owns the run folder."""


def _proc_start(pid: int) -> str | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux), None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: split after the last ')'
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None  # field 22: starttime


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[0] if fields else None


def _alive(pid: int, proc_start: str | None) -> bool:
    """Whether process ``pid`` of this host exists and is the one that wrote the lock."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    if _proc_state(pid) == "Z":  # a zombie: dead, not yet reaped by its parent
        return False
    now = _proc_start(pid)
    return not (proc_start is not None and now is not None and now != proc_start)


def _describe(info: dict[str, Any]) -> str:
    started = info.get("time")
    when = (time.strftime(", started %Y-%m-%d %H:%M:%S", time.localtime(started))
            if isinstance(started, (int, float)) else "")
    cmd = info.get("command")
    return (f"pid {info.get('pid')} on host {info.get('host')}{when}"
            + (f" ({cmd})" if cmd else ""))


class RunLock:
    """``run.lock`` of the run folder ``folder``: :meth:`acquire`, then :meth:`release`.

    ``acquire`` raises :class:`RunFolderLockedError` when a live run owns the folder; a stale lock
    (its process is gone from this host) is taken over and ``log`` is told.
    """

    def __init__(self, folder: str | os.PathLike, log: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.log = log or (lambda msg: None)
        self.info: dict[str, Any] | None = None  # what we wrote, while we hold the lock
        self.took_over: dict[str, Any] | None = None  # the stale owner we replaced, if any

    def _mine(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
                "time": time.time(), "command": " ".join(sys.argv)[:300]}

    def _read(self, path: Path | None = None) -> dict[str, Any] | None:
        """The owner recorded in the lock; None when there is no lock; {} when it is unreadable
        (being written, or a partial write of a process killed at that moment)."""
        try:
            text = (path or self.path).read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            info = json.loads(text)
        except ValueError:
            return {}
        return info if isinstance(info, dict) else {}

    def acquire(self, attempts: int = 20) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(attempts):
            info = self._mine()
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read()
                if owner is None:
                    continue  # released meanwhile: try again
                if not owner:
                    # empty or partial: a writer between its open and its write, or one killed
                    # right there; give a live writer a moment before calling it stale
                    try:
                        age = time.time() - self.path.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    if age < 5.0:
                        time.sleep(0.2)
                        continue
                if self._stale(owner):
                    self._take_over(owner)
                    continue
                raise RunFolderLockedError(self._locked_message(owner)) from None
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(info))
                fh.flush()
                os.fsync(fh.fileno())
            self.info = info
            if self.took_over is not None:
                self.log(f"run folder {self.folder}: took over the stale lock {self.path} of "
                         f"{_describe(self.took_over) if self.took_over else 'an unknown process'}"
                         ": that process no longer exists")
            return self
        owner = self._read() or {}
        raise RunFolderLockedError(f"{self.folder}: could not lock {self.path} after {attempts} "
                                   f"attempts (other runs are starting on it); owner: "
                                   f"{_describe(owner)}")

    def _stale(self, owner: dict[str, Any]) -> bool:
        if not owner:
            return True  # unreadable and old: its writer died while writing it
        if owner.get("host") != socket.gethostname():
            return False  # cannot be checked from here
        try:
            pid = int(owner.get("pid", -1))
        except (TypeError, ValueError):
            return True
        return not _alive(pid, owner.get("proc_start"))

    def _take_over(self, owner: dict[str, Any]) -> None:
        """Remove the stale lock ``owner``. It is renamed first and checked, so that a lock that a
        new run created in the meantime is put back, not deleted."""
        grave = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return
        if self._read(grave) != owner and owner:
            try:  # not the lock we judged: a live one, restore it unless another took its place
                os.link(grave, self.path)
            except OSError:
                pass
        else:
            self.took_over = owner
        grave.unlink(missing_ok=True)

    def _locked_message(self, owner: dict[str, Any]) -> str:
        here = owner.get("host") == socket.gethostname()
        return (f"run folder {self.folder} is in use by another run: {_describe(owner)} holds "
                f"{self.path}. Two runs on one folder would mix their checkpoints and metrics; wait "
                "for it to end or choose another --out."
                + ("" if here else f" It runs on another host, so it cannot be checked from here: "
                   f"if that run is gone, delete {self.path}."))

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        if self.info is None:
            return
        current = self._read()
        if current == self.info:
            self.path.unlink(missing_ok=True)
        self.info = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
