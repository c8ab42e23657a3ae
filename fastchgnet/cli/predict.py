"""``fastchgnet predict``: energy, forces, stress and magmoms of structure files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastchgnet.cli.common import add_device_arg, formula, prediction_table, read_structures, summarize
from fastchgnet.device import resolve_device
from fastchgnet.model import load_model

__all__ = ["add_predict", "json_units"]

ANGSTROM = "eV/Angstrom"


def json_units(pred_keys: set[str], intensive: bool = True) -> dict:
    """Units of every numeric field of a ``--json`` record, keyed as the record is."""
    per_output = {"e": "eV/atom" if intensive else "eV (per structure)", "f": ANGSTROM,
                  "s": "GPa (positive = tensile)", "m": "mu_B (magnitude)",
                  "site_energies": "eV", "crystal_fea": "dimensionless", "atom_fea": "dimensionless"}
    units: dict = {"n_atoms": "count"}
    units.update({k: v for k, v in per_output.items() if k in pred_keys})
    units["summary"] = {"e": per_output["e"], "fmax": f"{ANGSTROM} (largest |F|)",
                        "pressure": "GPa (positive = compressed)", "m_mean": "mu_B",
                        "m_max": "mu_B"}
    return units


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="energy, forces, stress and magmoms of structure files",
                       description="Predict with a CHGNet model for each structure file "
                                   "(CIF, POSCAR, extxyz, ... via pymatgen or ASE).")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--task", default="efsm", help="e, ef, efs, efsm, em, ... [%(default)s]")
    p.add_argument("--model", default="0.3.0",
                   help="pretrained name (0.3.0, 0.2.0, r2scan) or checkpoint path [%(default)s]")
    add_device_arg(p)
    p.add_argument("--batch-size", type=int, default=16, help="structures per batch [%(default)s]")
    p.add_argument("--json", metavar="OUT", help="write all predictions (full arrays) as JSON")
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    labels: list[str] = []
    structures: list = []
    for path in args.files:
        for label, s in read_structures(path):
            labels.append(label)
            structures.append(s)
    model = load_model(args.model, device=resolve_device(args.device))
    preds = model.predict(structures, task=args.task, batch_size=args.batch_size, ids=labels)
    print(prediction_table(labels, structures, preds))
    if args.json:
        records = []
        for label, s, p in zip(labels, structures, preds):
            records.append({"file": label, "formula": formula(s), "n_atoms": len(s),
                            **{k: v.tolist() for k, v in p.items()}, "summary": summarize(p)})
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        keys = {k for p in preds for k in p}
        out.write_text(json.dumps({"model": str(args.model), "task": args.task,
                                   "units": json_units(keys, model.config.is_intensive),
                                   "predictions": records}, indent=1) + "\n")
        print(f"# saved {out}")
    return 0
