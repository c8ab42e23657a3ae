"""The README's example runs as written, and the command line works end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    ns: dict = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), ns)  # noqa: S102
    pred = ns["pred"]
    assert set("efsm") <= set(pred)
    n = len(ns["structure"])
    assert pred["f"].shape == (n, 3) and pred["s"].shape == (3, 3) and pred["m"].shape == (n,)
    assert np.isfinite(pred["e"]) and -10 < float(pred["e"]) < 0
    assert len(ns["preds"]) == 2


def test_cli_predict_writes_json(tmp_path):
    from fastchgnet.data.prototypes import make

    cif = tmp_path / "NaCl.cif"
    make("rocksalt", ["Na", "Cl"], rattle=0.03, seed=1).to(filename=str(cif))
    out = tmp_path / "pred.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fastchgnet", "predict", str(cif), "--json", str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "NaCl" in proc.stdout
    data = json.loads(out.read_text())
    assert data, "no predictions written"


def test_cli_rejects_bad_file(tmp_path):
    bad = tmp_path / "bad.cif"
    bad.write_text("this is not a structure file\n")
    proc = subprocess.run([sys.executable, "-m", "fastchgnet", "predict", str(bad)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert "bad.cif" in (proc.stderr + proc.stdout)


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["bench", "--help"]])
def test_cli_help(argv):
    proc = subprocess.run([sys.executable, "-m", "fastchgnet", *argv], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_cli_is_a_leaf_package_and_help_stays_light():
    """Nothing in the library imports fastchgnet.cli; each command module imports on its own; the
    parser does not load the file readers (pymatgen, ase.io) nor the benchmark harness."""
    import ast

    for path in (ROOT / "fastchgnet").rglob("*.py"):
        if path.relative_to(ROOT / "fastchgnet").parts[0] in ("cli", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                    [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            assert not any(m == "fastchgnet.cli" or m.startswith("fastchgnet.cli.") for m in mods), path
    code = ("import sys\n"
            "import fastchgnet\n"
            "before = set(sys.modules)\n"
            "import fastchgnet.cli.md, fastchgnet.cli.train, fastchgnet.cli.predict, fastchgnet.cli.demo\n"
            "from fastchgnet.cli import build_parser\n"
            "build_parser()\n"
            "new = set(sys.modules) - before\n"
            "print([m for m in ('pymatgen.core', 'ase.io', 'fastchgnet.bench') if m in new])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
