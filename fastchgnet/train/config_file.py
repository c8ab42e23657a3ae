"""Run configuration files (``fastchgnet train --config run.yaml``): their keys and values as
:class:`~fastchgnet.train.config.TrainConfig` fields.

A key is a ``fastchgnet train`` option (``batch-size`` or ``batch_size``; ``weights``,
``no-plots``, ``refit-atomref``, ...) or a TrainConfig field (``prefactors``, ``plots``,
``refit_atom_ref``, ...), so the ``config.json`` of a run directory is itself a valid config file.
List options may be lists or the comma-separated text of the flag. JSON always works; YAML
(``.yaml`` / ``.yml``) needs PyYAML.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from fastchgnet.train.config import TrainConfig

__all__ = ["read_config_file", "config_fields"]

_FIELDS = {f.name for f in fields(TrainConfig)}
# flags whose TrainConfig field has another name (the value is mapped by _field_value)
_RENAMED = {"weights": "prefactors", "stage_two_weights": "stage_two_prefactors",
            "refit_atomref": "refit_atom_ref", "no_progress": "progress", "no_plots": "plots"}
_NEGATED = {"no_progress", "no_plots"}
_ARCH = ("force_head", "stress_head")  # flags that go into model_config


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a JSON or YAML file (ValueError naming the file when it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # optional: PyYAML
        except ImportError:
            raise ValueError(f"config file {path}: reading YAML needs PyYAML, which is not installed "
                             "(pip install pyyaml), or write the same keys as JSON (run.json)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {path}: not valid YAML ({exc})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path}: not valid JSON ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of options, got {type(data).__name__}")
    return data


def config_fields(options: dict[str, Any], source: str = "config file") -> dict[str, Any]:
    """TrainConfig fields of the ``options`` of a config file (keys as flags or fields)."""
    out: dict[str, Any] = {}
    arch: dict[str, Any] = {}
    for key, value in options.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in _ARCH:
            arch[name] = value
            continue
        field = _RENAMED.get(name, name)
        if field not in _FIELDS or name == "config":
            raise ValueError(f"{source}: unknown option {key!r} (use fastchgnet train's options, "
                             "e.g. batch-size, or TrainConfig fields)")
        out[field] = _field_value(name, field, value, source)
    if arch:
        out["model_config"] = {**out.get("model_config", {}), **arch}
    return out


def _field_value(name: str, field: str, value: Any, source: str) -> Any:
    if name in _NEGATED:
        return not bool(value)
    if field in ("prefactors", "stage_two_prefactors") and value is not None \
            and not isinstance(value, dict):
        nums = _numbers(value, 4, name, source)
        return dict(zip("efsm", nums))
    if field == "split":
        return tuple(_numbers(value, 3, name, source))
    if field == "freeze":
        return tuple(x for x in value.split(",") if x) if isinstance(value, str) else tuple(value)
    return value


def _numbers(value: Any, n: int, name: str, source: str) -> list[float]:
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        nums = [float(x) for x in items]
    except (TypeError, ValueError):
        nums = []
    if len(nums) != n:
        raise ValueError(f"{source}: {name} needs {n} numbers, got {value!r}")
    return nums
