"""The compiled model call of the ASE calculator (and so of relaxation and MD): when to compile,
a bound on compilations, eager fallback, and a report of what compiling cost.

:class:`GuardedForward` is a ``forward(batch, task)`` callable that runs a model call either
eagerly or through ``torch.compile`` (Inductor, dynamic shapes: the numbers of atoms, bonds and
angles change without a recompilation) and decides between the two by its ``policy``:

* ``"always"`` (``compile=True``): compile at the first call.
* ``"auto"`` (the calculator's default): run eagerly until the model calls have taken
  ``compile_after_s`` seconds in total, then compile. This is the ski-rental rule: a short job
  (a single point, a short relaxation) never pays the compile time, and a long one (MD) spends at
  most that time more than it would have with the right choice made in advance. On the CPU the
  compiled call is 1.3–1.5× faster from 8 to 64 atoms and compiling takes about a minute
  (``docs/performance.md``, "Compiled CPU path"), so the default ``compile_after_s`` is 60 s.
  After compiling, ``"auto"`` checks that it pays for the shapes at hand: the first 5 compiled
  calls of a cell size that also ran eagerly are compared with its last eager calls, and when the
  compiled median is not at least 5 % faster the forward goes back to eager for good (one INFO
  line; on 2 threads the compiled call can be slower than the eager one for small cells).
* ``"never"`` (``compile=False``): always eager.

Safety:

* **Fallback.** Compilation needs a working compiler toolchain (Inductor on the CPU compiles C++:
  no ``g++``/``clang++`` means no compilation; on CUDA it needs Triton). When it is missing, or a
  compiled call raises where the eager call of the same batch does not, the forward falls back to
  eager for good and logs one warning on the ``"fastchgnet"`` logger saying why. An error that
  the eager call raises as well (a bad structure) is raised as usual.
* **Bounded recompilations.** At most ``max_compiles`` compilations (default 4: a new task string,
  e.g. ``"ef"`` after ``"efsm"``, or a dtype is a new compilation; sizes are not). Past the bound,
  a call that would need another compilation runs eagerly instead
  (``torch.compiler.set_stance("fail_on_recompile")``, scoped to the call), and one line is
  logged. Dynamo's own global ``cache_size_limit`` is not touched.
* **Report.** :attr:`GuardedForward.report` (a :class:`CompileReport`) holds the mode, the number
  of compilations, the seconds they took, and the numbers of compiled and eager calls; the first
  compilation logs its time at INFO level.

Nothing global changes: settings are scoped to each call (:func:`compile_callable`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fastchgnet.compile.forward import _trace_autograd
from fastchgnet.compile.settings import compile_callable

__all__ = ["COMPILE_AFTER_S", "CompileReport", "GuardedForward", "compile_error",
           "compiler_available", "resolve_compile"]

log = logging.getLogger("fastchgnet")

#: default seconds of eager model calls before ``"auto"`` compiles (about one compilation's time
#: on a 2-core CPU; see docs/performance.md, "Compiled CPU path")
COMPILE_AFTER_S = 60.0

POLICIES = ("auto", "always", "never")

#: compiled calls of ``"auto"`` compared with the same size's last eager calls after compiling
TRIAL_CALLS = 5


def resolve_compile(compile: bool | str | None) -> str:
    """``True``/``"always"`` -> ``"always"``, ``False``/``None``/``"never"`` -> ``"never"``,
    ``"auto"`` -> ``"auto"``; anything else is a ValueError."""
    if compile is True:
        return "always"
    if compile is False or compile is None:
        return "never"
    if isinstance(compile, str) and compile.lower() in POLICIES:
        return compile.lower()
    raise ValueError(f"compile must be True, False, 'auto', 'always' or 'never', got {compile!r}")


def compiler_available(device: torch.device | str) -> tuple[bool, str]:
    """Whether Inductor can compile for ``device`` here, and if not, why (checked without
    compiling anything: a C++ compiler for the CPU, Triton for CUDA)."""
    dev = torch.device(device)
    if not hasattr(torch, "compile"):
        return False, "this torch has no torch.compile"
    try:
        if dev.type == "cuda":
            from torch.utils._triton import has_triton

            return (True, "") if has_triton() else (False, "Triton is not installed")
        if dev.type == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler

            cxx = get_cpp_compiler()
            if not (shutil.which(cxx) or os.path.isfile(cxx)):
                return False, f"C++ compiler {cxx!r} not found"
            return True, ""
    except Exception as exc:  # the toolchain probe raises its own error types
        first = str(exc).strip().splitlines()
        return False, f"no usable compiler ({type(exc).__name__}: {first[0] if first else ''})"
    return False, f"no Inductor backend for device type {dev.type!r} is assumed"


@dataclass
class CompileReport:
    """What compiling the model call cost and gave (``calc.compile_report``)."""

    policy: str
    mode: str = "eager"          # "eager", "compiled" or "eager (fallback)"
    reason: str = ""             # why the mode is what it is
    compiles: int = 0            # compilations done
    compile_s: float = 0.0       # wall time of the calls that compiled (compilation + one call)
    max_compiles: int = 4
    compiled_calls: int = 0
    eager_calls: int = 0
    eager_s: float = 0.0         # wall time of the eager calls
    limit_hits: int = 0          # calls run eagerly because of the compilation bound
    events: list[str] = field(default_factory=list)

    def summary(self) -> str:
        why = f"; {self.reason}" if self.reason else ""
        return (f"model call: {self.mode} (policy {self.policy!r}{why}); "
                f"{self.compiles} compilation(s) in {self.compile_s:.1f} s, "
                f"{self.compiled_calls} compiled and {self.eager_calls} eager call(s)")


def _counting(backend: str | Callable, counter: list[int]) -> Callable:
    """``backend`` that counts the graphs it compiles."""
    def compile_fn(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        counter[0] += 1
        fn = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend
        return fn(gm, example_inputs)
    return compile_fn


def compile_error(exc: BaseException) -> str:
    """``Type: first line`` of the compiler's own error (not Dynamo's wrapper of it,
    BackendCompilerFailed), for a log line."""
    cause = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
    first = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {first[0][:200] if first else ''}"


def _key(batch: Any, task: str) -> tuple[str, int]:
    return task, int(batch.positions.shape[0])


def _is_recompile_refusal(exc: Exception) -> bool:
    """The error of a recompilation under ``set_stance("fail_on_recompile")``."""
    return (isinstance(exc, getattr(torch._dynamo.exc, "RecompileError", ()))
            or "fail_on_recompile" in str(exc))


class GuardedForward:
    """``forward(batch, task) -> outputs``: ``eager(batch, task)`` or its ``torch.compile``, chosen
    by ``policy`` (see the module docstring).

    Args:
        eager: the model call, ``eager(batch, task) -> dict of tensors`` (outputs detached by the
            caller or here: every output is detached).
        device: where the model runs (which toolchain compilation needs).
        policy: ``"auto"``, ``"always"`` or ``"never"`` (or True/False, see :func:`resolve_compile`).
        compile_after_s: ``"auto"`` compiles once the eager calls have taken this long in total.
        max_compiles: bound on compilations (then eager for calls that would need another).
        backend, dynamic: passed to ``torch.compile`` (Inductor, dynamic shapes).
    """

    def __init__(self, eager: Callable[[Any, str], dict[str, torch.Tensor]], *,
                 device: torch.device | str = "cpu", policy: bool | str = "auto",
                 compile_after_s: float = COMPILE_AFTER_S, max_compiles: int = 4,
                 backend: str | Callable = "inductor", dynamic: bool = True) -> None:
        self.eager = eager
        self.device = torch.device(device)
        self.compile_after_s = float(compile_after_s)
        self.backend, self.dynamic = backend, dynamic
        self.report = CompileReport(policy=resolve_compile(policy), max_compiles=int(max_compiles))
        self._fn: Callable | None = None
        self._count = [0]
        # per (task, atoms): recent eager call times, and compiled call times under trial
        self._eager_t: dict[tuple[str, int], list[float]] = {}
        self._trial: dict[tuple[str, int], list[float]] = {}
        if self.report.policy == "never":
            self.report.reason = "compile=False"
        elif self.report.policy == "auto":
            self.report.reason = f"eager until the model calls have taken {self.compile_after_s:g} s"

    # ------------------------------------------------------------------------------------------
    @property
    def compiled(self) -> bool:
        """Whether calls now go through the compiled function."""
        return self._fn is not None

    def _detached(self, batch: Any, task: str) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.eager(batch, task).items()}

    def _fallback(self, why: str) -> None:
        self._fn = None
        self.report.mode, self.report.reason = "eager (fallback)", why
        self.report.events.append(why)
        log.warning("fastchgnet: the compiled model call is off, running eagerly: %s", why)

    def _start_compiling(self) -> bool:
        ok, why = compiler_available(self.device)
        if not ok:
            self._fallback(f"cannot compile on {self.device.type}: {why}")
            return False
        # one graph where Dynamo can trace autograd.grad (torch >= 2.11); else a break at it
        fullgraph = hasattr(torch._dynamo.config, "trace_autograd_ops")
        self._fn = compile_callable(self._detached, backend=_counting(self.backend, self._count),
                                    dynamic=self.dynamic, fullgraph=fullgraph)
        self.report.mode = "compiled"
        self.report.reason = ("compile=True" if self.report.policy == "always" else
                              f"the eager calls took {self.report.eager_s:.1f} s "
                              f"(>= {self.compile_after_s:g} s)")
        if self.report.policy == "auto":
            log.info("fastchgnet: compiling the model call (Inductor, dynamic shapes): %s",
                     self.report.reason)
        return True

    def _run_eager(self, batch: Any, task: str) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        out = self._detached(batch, task)
        dt = time.perf_counter() - t0
        self.report.eager_s += dt
        self.report.eager_calls += 1
        times = self._eager_t.setdefault(_key(batch, task), [])
        times.append(dt)
        del times[:-TRIAL_CALLS]
        return out

    def _check_trial(self, batch: Any, task: str, dt: float) -> None:
        """After ``"auto"`` compiled: the first :data:`TRIAL_CALLS` compiled calls of a size that
        also ran eagerly are compared with its last eager calls; a compiled call that is not
        faster (median) switches back to eager for good."""
        key = _key(batch, task)
        eager = self._eager_t.get(key, [])
        trial = self._trial.setdefault(key, [])
        if len(eager) < 3 or len(trial) >= TRIAL_CALLS:
            return
        trial.append(dt)
        if len(trial) < TRIAL_CALLS:
            return
        t_c, t_e = statistics.median(trial), statistics.median(eager)
        self.report.events.append(f"trial {key}: compiled {1e3 * t_c:.1f} ms, eager {1e3 * t_e:.1f} ms")
        if t_c > 0.95 * t_e:
            self._fn = None
            self.report.mode = "eager (compiled not faster)"
            self.report.reason = (f"compiled call {1e3 * t_c:.1f} ms against eager {1e3 * t_e:.1f} ms "
                                  f"({key[1]} atoms, task {key[0]!r})")
            log.info("fastchgnet: the compiled model call is not faster here (%s); back to eager",
                     self.report.reason)

    def _failed(self, exc: Exception, batch: Any, task: str) -> dict[str, torch.Tensor]:
        """A compiled call raised: a compiler failure (then eager from now on), unless the eager
        call raises too (an error of the batch itself, raised as usual)."""
        out = self._run_eager(batch, task)
        self._fallback(f"compilation or the compiled call failed ({compile_error(exc)})")
        return out

    def __call__(self, batch: Any, task: str) -> dict[str, torch.Tensor]:
        rep = self.report
        if self._fn is None and rep.mode == "eager":
            if rep.policy == "always" or (rep.policy == "auto" and rep.eager_s >= self.compile_after_s):
                self._start_compiling()
        if self._fn is None:
            return self._run_eager(batch, task)
        at_bound = self._count[0] >= rep.max_compiles
        before = self._count[0]
        t0 = time.perf_counter()
        stance = (torch.compiler.set_stance("fail_on_recompile") if at_bound
                  else contextlib.nullcontext())
        try:
            with stance, _trace_autograd():
                out = self._fn(batch, task)
        except Exception as exc:
            if not (at_bound and _is_recompile_refusal(exc)):
                return self._failed(exc, batch, task)
            rep.limit_hits += 1
            if rep.limit_hits == 1:
                log.warning("fastchgnet: the compiled model call reached its bound of %d "
                            "compilations; calls that would need another run eagerly (task %r)",
                            rep.max_compiles, task)
            return self._run_eager(batch, task)
        dt = time.perf_counter() - t0
        if self._count[0] > before:
            rep.compiles = self._count[0]
            rep.compile_s += dt
            log.info("fastchgnet: compiled the model call for task %r in %.1f s "
                     "(compilation %d of at most %d; later calls of any size reuse it)",
                     task, dt, rep.compiles, rep.max_compiles)
            rep.events.append(f"compiled task {task!r} in {dt:.1f} s")
        elif rep.policy == "auto":
            self._check_trial(batch, task, dt)
        rep.compiled_calls += 1
        return out
