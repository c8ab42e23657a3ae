"""Start-up of the ``fastchgnet`` command: OpenMP wait policy and torch threads, when the user has
not chosen them.

With libgomp's default wait policy, idle OpenMP workers spin for a while after each parallel
region. On a machine whose cores are shared with another busy process, that spinning takes the
cores the other threads need: 2-thread model calls ran 5–100× slower than 1-thread calls
(an 8-atom call took 0.3–9 s), and ``OMP_WAIT_POLICY=PASSIVE`` removed it (docs/performance.md,
"Threads"). The command therefore runs with:

* ``OMP_WAIT_POLICY=PASSIVE`` unless ``OMP_WAIT_POLICY`` is set (any value is kept). libgomp reads
  it once, when torch is first imported, and ``import fastchgnet`` imports torch, so the command
  re-executes itself once with the variable added (:func:`relaunch`; skipped for ``--help`` and
  ``--version``, on Windows, for a script read from stdin, and when ``FASTCHGNET_NO_RELAUNCH=1``).
* glibc's allocator keeps freed memory for reuse: ``MALLOC_MMAP_THRESHOLD_=33554432`` and
  ``MALLOC_TRIM_THRESHOLD_=1073741824`` unless one of them, ``GLIBC_TUNABLES`` or ``LD_PRELOAD``
  (another allocator) is set (Linux with glibc only). With glibc's defaults, the tensors of a
  training step or an MD step are fresh pages every time: an exact-model training step at batch
  8 took 54,000 page faults (about 85 ms of 515 ms on the development VM), and none with these
  two settings (435 ms). The price: up to 1 GB of freed memory stays with the process
  (its peak is unchanged).
* torch's CPU allocator asks for transparent huge pages for tensors of 2 MB and more:
  ``THP_MEM_ALLOC_ENABLE=1`` unless it is set (Linux with glibc; torch reads it once, at its
  first allocation). On the 2-core AMD EPYC Zen 4 VM, with the two allocator settings above, the
  exact-model training step at batch 8 took 620–676 ms with it and 647–759 ms without it (five
  pairs of fresh processes, every pair faster with it); MD steps were unchanged within noise.
  Where the kernel's huge pages are off (``/sys/kernel/mm/transparent_hugepage/enabled`` is
  ``never``) it changes nothing.
* torch intra-op threads: ``FASTCHGNET_THREADS`` when set; else, unless ``OMP_NUM_THREADS`` is
  set, the CPUs this process may use (its affinity mask and cgroup CPU quota) when torch's
  default is larger (torch counts the host's cores, which in a container can be many more than the
  container may use).

The library itself changes no global state on import: only the command does this, for its own
process. ``python -m fastchgnet``, ``python -m fastchgnet.cli`` and the ``fastchgnet`` console
script all start through :func:`console_main`.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Mapping, MutableMapping, Sequence

__all__ = ["MALLOC_DEFAULTS", "THP_DEFAULT", "WAIT_POLICY_DEFAULT", "console_main", "env_defaults", "relaunch", "runtime_setting",
           "set_default_threads", "usable_cpus"]

WAIT_POLICY_DEFAULT = "PASSIVE"
_MARK = "FASTCHGNET_LAUNCH_DEFAULTS"  # names of the variables the command set (not the user)
_NO_COMPUTE = {"-h", "--help", "--version"}


#: glibc allocator settings of the command (see the module docstring)
MALLOC_DEFAULTS = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
_ALLOCATOR_CHOSEN = ("GLIBC_TUNABLES", "LD_PRELOAD", *MALLOC_DEFAULTS)
#: torch's huge-page setting of the command (see the module docstring)
THP_DEFAULT = {"THP_MEM_ALLOC_ENABLE": "1"}


def _glibc() -> bool:
    import platform

    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def env_defaults(environ: Mapping[str, str], glibc: bool | None = None) -> dict[str, str]:
    """The environment variables the command adds: only those the user has not set."""
    add = {} if "OMP_WAIT_POLICY" in environ else {"OMP_WAIT_POLICY": WAIT_POLICY_DEFAULT}
    if not (_glibc() if glibc is None else glibc):
        return add
    if not any(k in environ for k in _ALLOCATOR_CHOSEN):
        add.update(MALLOC_DEFAULTS)
    if not any(k in environ for k in THP_DEFAULT):
        add.update(THP_DEFAULT)
    return add


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2/v1 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(n, quota) if quota else n)


def _cgroup_quota() -> int | None:
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:  # cgroup v2: "max 100000" or "200000 100000"
            q, p = f.read().split()[:2]
        return None if q == "max" else math.ceil(int(q) / int(p))
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            q = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            p = int(f.read())
        return None if q <= 0 else math.ceil(q / p)
    except (OSError, ValueError):
        return None


def set_default_threads(environ: Mapping[str, str] | None = None) -> int:
    """Set torch's intra-op threads for this process as described in the module docstring;
    returns the number in use."""
    import torch

    environ = os.environ if environ is None else environ
    want = environ.get("FASTCHGNET_THREADS", "").strip()
    if want:
        n = int(want)
        if n < 1:
            raise ValueError(f"FASTCHGNET_THREADS must be a positive integer, got {want!r}")
        torch.set_num_threads(n)
    elif not environ.get("OMP_NUM_THREADS"):
        cpus = usable_cpus()
        if torch.get_num_threads() > cpus:
            torch.set_num_threads(cpus)
    return torch.get_num_threads()


def runtime_setting() -> dict[str, object]:
    """What this process runs with (for logs and benchmark records): torch threads, the OpenMP
    wait policy (``"unset"`` for libgomp's default) and who chose it (user or command)."""
    import torch

    set_by = os.environ.get(_MARK, "")
    return {"torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
            "malloc": {k: os.environ[k] for k in (*_ALLOCATOR_CHOSEN, *THP_DEFAULT)
                       if k in os.environ} or "default",
            "set_by_command": sorted(v for v in set_by.split(",") if v)}


def _is_compute(argv: Sequence[str]) -> bool:
    return bool(argv) and not any(a in _NO_COMPUTE for a in argv)


def relaunch(argv: Sequence[str] | None = None,
             environ: MutableMapping[str, str] | None = None, *, execute: bool = True) -> list[str] | None:
    """Re-execute this process with :func:`env_defaults` added, when that is needed and safe.

    Returns None when nothing is to be done; otherwise the command line it executes (with
    ``execute=False``: the command line it would execute, for tests). ``os.execve`` does not
    return."""
    environ = os.environ if environ is None else environ
    argv = sys.argv[1:] if argv is None else list(argv)
    add = env_defaults(environ)
    if (not add or environ.get("FASTCHGNET_NO_RELAUNCH") == "1" or _MARK in environ
            or os.name != "posix" or not _is_compute(argv) or sys.argv[0] in ("", "-")):
        return None
    orig = list(getattr(sys, "orig_argv", []))
    if not orig:
        return None
    cmd = [sys.executable, *orig[1:]]
    if not execute:
        return cmd
    env = dict(environ)
    env.update(add)
    env[_MARK] = ",".join(sorted(add))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)
    return cmd  # not reached


def _log_to_stderr() -> None:
    """The command shows the library's INFO lines (e.g. the compile time of the model call)."""
    import logging

    logger = logging.getLogger("fastchgnet")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("# %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def console_main(argv: Sequence[str] | None = None) -> int:
    """The ``fastchgnet`` command: :func:`relaunch` (only for the real command line, ``argv`` None),
    :func:`set_default_threads`, then :func:`fastchgnet.cli.main`."""
    if argv is None:
        relaunch()
    set_default_threads()
    _log_to_stderr()
    from fastchgnet.cli import main

    return main(argv)
