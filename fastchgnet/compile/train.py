"""When the trainer's forward is compiled: ``--compile`` (at the first step), ``auto`` (the
default: the ski-rental rule on the CPU) or ``off``.

:class:`TrainForward` is the trainer's ``forward(batch, task, create_graph)``: the model (or its
DDP wrapper) called eagerly, or its ``torch.compile`` (:func:`~fastchgnet.compile.compile_callable`,
dynamic shapes). With a model whose forces are energy derivatives, the compiled forward takes
them with ``torch.func.grad`` inside the graph (``CHGNet._traced_gradient``), so the whole
training step runs compiled and differentiated once.

Policies (``TrainConfig.compile``):

* a backend name (``"inductor"``, ``"aot_eager"``, ...; ``--compile [BACKEND]``): compile at the
  first step;
* ``"auto"`` (the default): on one CPU process, train eagerly until the steps have taken
  :data:`COMPILE_AFTER_S` seconds, then compile with Inductor if the steps the run still plans
  would take at least twice that long eagerly. The compilation took about two minutes on a
  2-core CPU and made the exact model's step 1.8x faster there (docs/performance.md), so a short
  fine-tune never pays it and a long run loses at most about that time against the right choice
  made in advance. After compiling, the first
  :data:`TRIAL_STEPS` compiled steps are compared, per unit of work (atoms + directed bonds +
  angles, the load balancer's cost), with the last eager ones (not the run's first step, which
  warms up); when they
  are not at least 5 % faster, training goes back to eager for good. On CUDA and in distributed
  runs ``"auto"`` stays eager (not measured there);
  Where this machine compiled the same step before (:mod:`fastchgnet.compile.memory`, a record
  beside Inductor's on-disk cache), ``"auto"`` compiles after :data:`RECALL_AFTER_STEPS` eager
  steps instead, when the steps left would save :data:`RECALL_MARGIN` times the expected compile
  time at the recorded speed-up;
* ``"off"`` / None: always eager.

A compiled step that raises (no C++ compiler, an unsupported batch) is run again eagerly and the
run stays eager from then on; the log says why. Nothing global changes (settings are scoped to
each call).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable

import torch

from fastchgnet.compile import memory
from fastchgnet.compile.auto import compile_error, compiler_available
from fastchgnet.compile.settings import compile_callable

__all__ = ["ASSUMED_SPEEDUP", "COMPILE_AFTER_S", "RECALL_AFTER_STEPS", "RECALL_MARGIN", "TRIAL_STEPS",
           "TrainForward", "resolve_train_compile"]

#: seconds of eager training steps after which ``"auto"`` compiles (about one compilation)
COMPILE_AFTER_S = 120.0
#: compiled steps compared with the last eager ones after ``"auto"`` compiled
TRIAL_STEPS = 5
#: eager steps before ``"auto"`` acts on a recalled compilation: the step time it needs, and
#: enough eager steps for the trial to measure the speed-up it records for the next run (on 2
#: threads the compiled step was only 1.2x faster, too little to pay 8 s in a 3-epoch fine-tune)
RECALL_AFTER_STEPS = 3
#: compiled steps slower than this fraction of the eager time per unit of work are "not faster"
NOT_FASTER = 0.95
#: ... and this, after a compilation recalled from a record (which measured a speed-up before)
RECALLED_SLOWER = 1.1
#: a recalled compilation is made when the steps left would save this many times its cost
RECALL_MARGIN = 1.5
#: speed-up assumed for a recalled compilation whose speed-up was not measured (``--compile``
#: runs have no eager steps); the exact model's compiled step measured 1.5-2.2x on CPUs
ASSUMED_SPEEDUP = 1.5
OFF = ("off", "never", "none", "false")


def resolve_train_compile(value: str | None) -> str | None:
    """``TrainConfig.compile`` as a policy: None (off), ``"auto"``, or a backend name."""
    if value is None or str(value).lower() in OFF:
        return None
    return "auto" if str(value).lower() == "auto" else str(value)


class TrainForward:
    """``forward(batch, task=..., create_graph=...)`` of the trainer, eager or compiled (see the
    module docstring). ``can_auto``: whether ``"auto"`` may compile here (one CPU process);
    ``log``: one line per decision."""

    def __init__(self, eager: Callable[..., Any], policy: str | None, *, device: torch.device,
                 can_auto: bool, fullgraph: bool = True,
                 compile_after_s: float = COMPILE_AFTER_S, auto_backend: str = "inductor",
                 log: Callable[[str], None] = lambda msg: None,
                 memory_key: str | None = None) -> None:
        self.eager, self.device, self.log = eager, torch.device(device), log
        self.auto_backend = auto_backend
        self.policy = resolve_train_compile(policy)
        self.fullgraph, self.compile_after_s = fullgraph, float(compile_after_s)
        self.auto = self.policy == "auto" and can_auto
        self.mode = "eager"  # "eager", "compiled", "eager (fallback)", "eager (not faster)"
        self.eager_s = 0.0
        self._fn: Callable[..., Any] | None = None
        self._eager_work: list[tuple[float, int]] = []  # (seconds, work) of recent eager steps
        self._eager_step: list[float] = []
        self._trial: list[tuple[float, int]] | None = None
        self._first_compiled_s: float | None = None
        self._from_cache = self._expected_cached = False
        self._eager_steps = 0
        self._misses = 0  # cache misses before the compilation
        # Inductor compiles; memory_key: this step's key in fastchgnet.compile.memory
        inductor = (self.auto and auto_backend == "inductor") or self.policy == "inductor"
        self.memory_key = memory_key if inductor else None
        self.recalled = (memory.recall(memory_key) if self.auto and self.memory_key is not None
                         else None)
        if self.policy not in (None, "auto"):
            self._compile(self.policy, f"--compile {self.policy}")

    @property
    def compiled(self) -> bool:
        """Whether the next step runs compiled."""
        return self._fn is not None

    def __call__(self, batch: Any, **kwargs: Any) -> Any:
        return (self._fn or self.eager)(batch, **kwargs)

    def _compile(self, backend: str, why: str) -> None:
        if backend == "inductor":
            ok, reason = compiler_available(self.device)
            if not ok:
                self.mode = "eager (fallback)"
                self.log(f"compile: training eagerly, cannot compile here ({reason})")
                return
        self._fn = compile_callable(self.eager, backend=backend, fullgraph=self.fullgraph)
        self._misses = memory.cache_misses()
        self.mode = "compiled"
        self.log(f"compile: compiling the training step ({backend}, dynamic shapes): {why}; "
                 "the next step includes the compilation")

    def failed(self, exc: BaseException) -> None:
        """A compiled step raised: eager from now on (the caller runs the step again)."""
        self._fn = None
        self.mode = "eager (fallback)"
        self.log(f"compile: the compiled training step failed ({compile_error(exc)}); "
                 "training eagerly from now on")

    def step_done(self, seconds: float, work: int, compiled: bool,
                  remaining_steps: int | None = None) -> None:
        """Record a finished step (``compiled``: it ran compiled; ``remaining_steps``: how many
        the run still plans); ``"auto"`` decides here."""
        if compiled and self._first_compiled_s is None:  # the step that compiled
            self._first_compiled_s = seconds
            self._from_cache = memory.cache_misses() == self._misses
            if self.memory_key is not None:  # the speed-up: the last measured (trial below)
                before = memory.recall(self.memory_key) or {}
                memory.remember(self.memory_key, seconds, before.get("speedup"),
                                from_cache=self._from_cache,
                                expected_cached=self._expected_cached)
        if not self.auto:
            return
        if not compiled:
            if self.mode != "eager":
                return
            self.eager_s += seconds
            self._eager_steps += 1
            if self._eager_steps == 1:  # the first step warms up (allocations, lazy set-up)
                return
            self._eager_step = (self._eager_step + [seconds])[-TRIAL_STEPS:]
            self._eager_work = (self._eager_work + [(seconds, work)])[-TRIAL_STEPS:]
            left = (statistics.mean(self._eager_step) * remaining_steps
                    if remaining_steps is not None else float("inf"))
            if self.recalled is not None and len(self._eager_step) >= RECALL_AFTER_STEPS:
                rec, self.recalled = self.recalled, None  # decided once
                cost = memory.expected_cost(rec)
                speedup = rec.get("speedup") or ASSUMED_SPEEDUP
                saving = left * (1 - 1 / speedup) if speedup > 1 else 0.0
                if cost is not None and saving >= RECALL_MARGIN * cost:
                    self._trial = None
                    self._expected_cached = True
                    self._compile(self.auto_backend,
                                  f"this step was compiled here before (Inductor's cache: about "
                                  f"{cost:.0f} s now) and ran {speedup:.2f}x faster; the "
                                  f"{remaining_steps} steps left would save about {saving:.0f} s")
                    return
            # what is left must be worth a compilation: at the measured speed-up (1.8x) the
            # remaining eager time has to be about twice the compile time
            if self.eager_s >= self.compile_after_s and left >= 2 * self.compile_after_s:
                self._trial = None
                self._compile(self.auto_backend, f"the eager steps took {self.eager_s:.0f} s "
                                          f"(>= {self.compile_after_s:g} s)")
            return
        if self._trial is None:  # the step that compiled
            self._trial = []
            self.log(f"compile: the first compiled step took {seconds:.1f} s")
            return
        if len(self._trial) >= TRIAL_STEPS or len(self._eager_work) < 3:
            return
        self._trial.append((seconds, work))
        if len(self._trial) < TRIAL_STEPS:
            return
        # time per unit of work over all the steps (batches differ in size: a ratio of sums)
        t_c, t_e = _rate(self._trial), _rate(self._eager_work)
        if self.memory_key is not None and self._first_compiled_s is not None:
            # five steps are noisy: the record keeps the geometric mean with the speed-up measured
            # before, so one low trial does not stop later runs from compiling (and re-measuring)
            before = (memory.recall(self.memory_key) or {}).get("speedup")
            speedup = t_e / t_c if not before else math.sqrt(before * t_e / t_c)
            memory.remember(self.memory_key, self._first_compiled_s, speedup,
                            from_cache=self._from_cache, expected_cached=self._expected_cached)
        # a compilation recalled from a record goes back to eager only when clearly slower: five
        # steps of batches that differ are weak evidence against a speed-up measured before
        if t_c > (RECALLED_SLOWER if self._expected_cached else NOT_FASTER) * t_e:
            self._fn = None
            self.mode = "eager (not faster)"
            self.log(f"compile: compiled steps are not faster here ({1e9 * t_c:.0f} vs "
                     f"{1e9 * t_e:.0f} ns per unit of work eager); training eagerly from now on")
        else:
            self.log(f"compile: compiled steps {1e9 * t_c:.0f} ns per unit of work (atom, bond, "
                     f"angle) against {1e9 * t_e:.0f} eager ({t_e / t_c:.2f}x); keeping them")


def _rate(steps: list[tuple[float, int]]) -> float:
    """Seconds per unit of work of ``(seconds, work)`` steps."""
    return sum(t for t, _ in steps) / max(sum(w for _, w in steps), 1)
