"""Reports of a training run: the test MAE table and parity plots (PNG).

Plots are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas: no pyplot, no
global matplotlib state is touched.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["mae_table", "parity_plots"]

TARGETS = {
    "e": ("energy", "eV/atom"),
    "f": ("forces", "eV/Å"),
    "s": ("stress", "GPa"),
    "m": ("magnetic moments", "μB"),
}


def parity_plots(res: dict[str, Any], out: str | Path, max_points: int = 20000) -> list[Path]:
    """One PNG per target with labels (``true_<k>``) and predictions (``pred_<k>``) in ``res``;
    returns the files written (``parity_energy.png``, ``parity_forces.png``, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    written = []
    rng = np.random.default_rng(0)
    for key, (name, unit) in TARGETS.items():
        y, p = res.get(f"true_{key}"), res.get(f"pred_{key}")
        if y is None or p is None or len(y) == 0:
            continue
        y, p = np.asarray(y), np.asarray(p)
        if len(y) > max_points:  # keep the file small; the MAE is over all points
            pick = rng.choice(len(y), max_points, replace=False)
            ys, ps = y[pick], p[pick]
        else:
            ys, ps = y, p
        fig = Figure(figsize=(4.2, 4.0), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.scatter(ys, ps, s=4, alpha=0.4, linewidths=0)
        lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
        pad = 0.02 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel(f"label ({unit})")
        ax.set_ylabel(f"prediction ({unit})")
        mae = float(np.abs(p - y).mean())
        ax.set_title(f"{name}: MAE {mae:.4g} {unit} (n={len(y)})", fontsize=9)
        fig.tight_layout()
        path = out / f"parity_{name.split()[0] if key != 'm' else 'magmom'}.png"
        fig.savefig(path)
        written.append(path)
    return written


def _cell(v: Any, scale: float = 1.0, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(float(v) * scale, spec)


def mae_table(result: dict[str, Any]) -> str:
    """The test MAEs as a small text table (energy and forces in meV)."""
    rows = [("energy", _cell(result.get("e_mae"), 1e3), "meV/atom"),
            ("forces", _cell(result.get("f_mae"), 1e3), "meV/Å"),
            ("stress", _cell(result.get("s_mae")), "GPa"),
            ("magmom", _cell(result.get("m_mae")), "μB")]
    if "baseline_e_mae" in result:
        rows.append(("energy, per-element baseline", _cell(result.get("baseline_e_mae"), 1e3), "meV/atom"))
    w = max(len(r[0]) for r in rows)
    lines = [f"test MAE ({result.get('n_test', '?')} structures)"]
    lines += [f"  {name.ljust(w)}  {val:>10}  {unit}" for name, val, unit in rows]
    return "\n".join(lines)
