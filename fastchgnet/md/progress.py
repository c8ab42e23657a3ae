"""Progress lines of long relaxations and MD runs (``verbose=`` and the command line).

A :class:`Progress` prints one line per report at most every ``interval`` seconds (the first and
the last step always), so a run of 10,000 steps prints tens of lines, not 10,000, and a slow run
still says where it is. Lines go to ``stderr`` by default (stdout keeps the result tables).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

__all__ = ["Progress", "progress_from_verbose"]

DEFAULT_INTERVAL = 2.0  # seconds between progress lines


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


class Progress:
    """Throttled progress lines: ``<what> step i/n (p%) <fields> <elapsed> [ETA]``.

    Args:
        what: the prefix (``"relax Si8"``, ``"md Si64"``).
        total: the last step expected (None: unknown, no percentage or ETA).
        interval: seconds between lines; 0 prints every report.
        stream: where to write (default ``sys.stderr`` at the time of writing).
    """

    def __init__(self, what: str, total: int | None = None, interval: float = DEFAULT_INTERVAL,
                 stream: TextIO | None = None) -> None:
        self.what = what
        self.total = total
        self.interval = float(interval)
        self.stream = stream
        self.t0 = time.perf_counter()
        self._last: float | None = None
        self._first_step: int | None = None
        self.n_lines = 0

    def due(self, step: int, last: bool = False) -> bool:
        """Whether a line should be printed for ``step`` now."""
        if self._last is None or last or (self.total is not None and step >= self.total):
            return True
        return time.perf_counter() - self._last >= self.interval

    def report(self, step: int, fields: str | Callable[[], str], last: bool = False) -> None:
        """Print ``fields`` (a string, or a function called only when a line is due)."""
        if self._first_step is None:
            self._first_step = step
        if not self.due(step, last):
            return
        now = time.perf_counter()
        self._last = now
        text = fields() if callable(fields) else fields
        elapsed = now - self.t0
        where = f"step {step}"
        eta = ""
        if self.total is not None and self.total > 0:
            where += f"/{self.total} ({100.0 * step / self.total:.0f}%)"
            done = step - self._first_step
            if 0 < done and step < self.total:
                eta = f" ETA {_duration(elapsed / done * (self.total - step))}"
        stream = self.stream if self.stream is not None else sys.stderr
        print(f"{self.what}: {where} {text} [{_duration(elapsed)}{eta}]", file=stream, flush=True)
        self.n_lines += 1


def progress_from_verbose(verbose: Any, what: str, total: int | None) -> Progress | None:
    """``verbose=False`` -> None; ``True`` -> a line at most every 2 s; a number -> that interval
    in seconds (0: every step)."""
    if verbose is False or verbose is None:
        return None
    interval = DEFAULT_INTERVAL if verbose is True else float(verbose)
    if interval < 0:
        raise ValueError(f"verbose must be a bool or an interval in seconds >= 0, got {verbose!r}")
    return Progress(what, total, interval)
