"""The house rules of docs/architecture.md, checked on the source (no imports executed).

* no import cycle between modules, imports inside functions counted;
* the benchmark harness (``fastchgnet.bench``) and the CLI (``fastchgnet.cli``) are leaves:
  nothing else in the library imports them;
* ``kernels/`` (``fastchgnet.kernels``) imports nothing else of fastchgnet: the dispatch point
  (``fastchgnet.nn.fused``) lives on the nn side only;
* the library does not import its own deprecated compatibility modules;
* each room (subpackage) imports only the rooms below it (``ROOMS``, as in docs/architecture.md);
* no source file over 700 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fastchgnet": ROOT / "fastchgnet", "fastchgnet.kernels": ROOT / "kernels"}
# modules kept only so that old import paths work (each warns or says so); the library must not
# import them
COMPAT = {"fastchgnet.bench_train", "fastchgnet.bench_trainer", "fastchgnet.bench_memory",
          "fastchgnet.bench_md", "fastchgnet.bench_scaling", "fastchgnet.md.batched",
          "fastchgnet.md.compiled", "fastchgnet.model.compile", "fastchgnet.train.trainer"}
LEAVES = ("fastchgnet.bench", "fastchgnet.cli", "fastchgnet.__main__")
# what each room may import besides itself and the foundations (units, keys, device, tables),
# which import nothing of ours; the data flow of docs/architecture.md, top to bottom
FOUNDATIONS = {"units", "keys", "device", "tables"}
ROOMS = {
    "kernels": set(),
    "nn": {"kernels"},
    "data": set(),
    "model": {"nn", "data"},
    "sim": {"nn", "data", "model"},
    "compile": {"kernels", "nn", "data", "model"},
    "md": {"data", "model", "sim", "compile"},
    "compat": {"data", "model", "sim", "compile", "md"},  # chgnet's API on ours (above md)
    "train": {"data", "model", "compile"},
    "properties": {"data", "model", "sim", "md"},  # Hessian, charges, D3, EOS, phonons, elastic
    "lammps": {"data", "model", "compile", "md"},  # fix external driver (across MPI ranks)
    "torchsim": {"data", "model", "sim"},  # torch-sim ModelInterface
    "": {"data", "model", "md"},  # the package itself (public API; md imported lazily)
    "bench": {"kernels", "nn", "data", "model", "sim", "compile", "md", "train", "properties",
              "lammps", "torchsim", ""},
    "cli": {"bench", "data", "model", "sim", "compile", "md", "train", "properties", "lammps",
            "torchsim", ""},
    "__main__": {"cli"},
}


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg, base in PACKAGES.items():
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Modules of ours that ``name`` imports anywhere in its file (functions included).
    ``from pkg import sub`` counts as importing ``pkg.sub`` when that is a module, else ``pkg``."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:
                    out.add(sub)
                elif base in MODULES:
                    out.add(base)
    out.discard(name)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles() == []


def _in(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_harness_and_cli_are_leaves():
    bad = [f"{m} imports {t}" for m, ts in GRAPH.items() for t in ts
           if any(_in(t, leaf) for leaf in LEAVES)
           and not any(_in(m, leaf) for leaf in LEAVES) and m not in COMPAT]
    assert bad == []


def test_kernels_import_nothing_else_of_fastchgnet():
    bad = [f"{m} imports {t}" for m, ts in GRAPH.items() if _in(m, "fastchgnet.kernels")
           for t in ts if not _in(t, "fastchgnet.kernels")]
    assert bad == []


def test_library_does_not_import_compat_modules():
    bad = [f"{m} imports {t}" for m, ts in GRAPH.items() if m not in COMPAT
           for t in ts if t in COMPAT]
    assert bad == []


def _room(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_rooms_import_only_the_rooms_below_them():
    bad = []
    for m, ts in GRAPH.items():
        if m in COMPAT:
            continue
        own = _room(m)
        assert own in ROOMS or own in FOUNDATIONS, f"{m}: a new room? add it to ROOMS and the docs"
        allowed = set() if own in FOUNDATIONS else ROOMS[own]
        bad += [f"{m} imports {t}" for t in ts
                if _room(t) != own and _room(t) not in FOUNDATIONS | allowed]
    assert bad == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_source_file_over_700_lines(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= 700, f"{MODULES[name].relative_to(ROOT)} has {n} lines: split it by concern"


def test_every_package_is_installed():
    """A package missing from pyproject's list works in an editable install and vanishes from a
    wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert found == listed
