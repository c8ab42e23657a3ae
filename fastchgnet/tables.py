"""Plain-text tables for terminal output (the CLI and the benchmark harness share them)."""

from __future__ import annotations

from typing import Any

__all__ = ["fmt_or_na", "text_table"]


def fmt_or_na(v: Any, spec: str, missing: str = "n/a") -> str:
    """``format(v, spec)``, or ``missing`` for a missing value (None)."""
    return missing if v is None else format(v, spec)


def text_table(head: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: a header, a rule, the rows; first column left-aligned, others right."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])
