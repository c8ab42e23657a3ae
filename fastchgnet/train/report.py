"""Reports of a training run: the run log, ``metrics.csv``, ``test.json``, the test MAE table and
parity plots (PNG).

Plots are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas: no pyplot, no
global matplotlib state is touched.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["METRIC_COLUMNS", "json_safe", "mae_table", "open_tensorboard", "parity_plots",
           "read_metrics", "run_logger", "write_json", "write_metrics"]

#: the columns of metrics.csv (one row per epoch)
METRIC_COLUMNS = ("epoch", "step", "time_s", "lr", "train_loss", "val_loss", "val_e_mae",
                  "val_f_mae", "val_s_mae", "val_m_mae", "structures_per_s", "load_cv")


def run_logger(out: Path, log: Callable[[str], None] | None = None) -> Callable[[str], None]:
    """A log function for a run: ``log`` (default: print) and a line appended to out/train.log."""
    def _log(msg: str) -> None:
        (log or (lambda m: print(m, flush=True)))(msg)
        with open(Path(out) / "train.log", "a") as fh:
            fh.write(msg + "\n")
    return _log


def read_metrics(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a ``metrics.csv`` (strings, as written); ``[]`` when there is no file."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def open_tensorboard(out: Path) -> Any:
    """A TensorBoard ``SummaryWriter`` writing to ``out/tensorboard`` (``--tensorboard``);
    ValueError with what to install when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package, which is not installed "
                         "(pip install tensorboard); metrics.csv has the same numbers") from None
    return SummaryWriter(log_dir=str(Path(out) / "tensorboard"))


def write_metrics(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append the epoch ``row`` to ``metrics.csv`` (atomically), dropping the rows of that epoch
    and later ones that a resumed run redoes."""
    path = Path(path)
    rows = [r for r in read_metrics(path) if int(r["epoch"]) < row["epoch"]]
    rows.append({k: row[k] for k in METRIC_COLUMNS})
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    os.replace(tmp, path)


def json_safe(obj: Any) -> Any:
    """NaN/inf (a target without labels) as null, so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as strict JSON (see :func:`json_safe`), written atomically (a temporary file and a
    rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=1) + "\n")
    os.replace(tmp, path)
    return path

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
        rows.append(("energy, per-element linear fit of the training labels",
                     _cell(result.get("baseline_e_mae"), 1e3), "meV/atom"))
    w = max(len(r[0]) for r in rows)
    what = result.get("test_set")  # a training run's: what the set is (e.g. held-out part of --data)
    n = result.get("n_test", "?")
    lines = [f"MAE on {what} ({n} structures)" if what else f"test MAE ({n} structures)"]
    lines += [f"  {name.ljust(w)}  {val:>10}  {unit}" for name, val, unit in rows]
    return "\n".join(lines)
