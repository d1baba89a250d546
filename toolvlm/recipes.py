"""Typed dataclass configs from YAML recipes, with `key=value` overrides from the command line.

One generic helper instead of a chain of `if args.x is not None`: `load_recipe(path, Config, ["lr=3e-4",
"lora.r=8"])` reads the YAML, applies the dotted overrides (values parsed as YAML scalars, so `true`, `1e-4` and
`[1, 2]` mean what they look like), and builds the nested dataclass, refusing unknown keys by name. `save_config`
writes the resolved config next to the weights (as nanoVLM does) so a run can be rebuilt from its folder.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> `{"a": {"b": 1}, "c": "x"}`; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"override {pair!r} is not key=value")
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {pair!r} sets inside {part!r}, which is a value")
        node[leaf] = scalar(raw)
    return tree


def scalar(raw: str) -> Any:
    """A YAML scalar, except that numbers YAML 1.1 reads as text ('1e-3', '5E+4') are numbers."""
    if not raw.strip():
        return ""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            return value
    return value


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `update` into a copy of `base`."""
    out = dict(base)
    for key, value in update.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from nested dicts, refusing unknown keys and building nested dataclasses."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown keys {unknown} in {where or cls.__name__}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        inner = _dataclass_in(hints[name])
        if inner is not None and isinstance(value, dict):
            value = from_dict(inner, value, f"{where}.{name}" if where else name)
        kwargs[name] = value
    return cls(**kwargs)


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def load_recipe(path: str | Path | None, cls: type[T], overrides: Sequence[str] = ()) -> T:
    """Read a YAML recipe (or start from defaults when `path` is None), apply overrides, build `cls`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
    return from_dict(cls, merge(data, parse_overrides(overrides)))


def save_config(config: Any, path: str | Path) -> None:
    """Write a dataclass config as JSON (or YAML, by suffix)."""
    data = dataclasses.asdict(config)
    path = Path(path)
    text = (
        yaml.safe_dump(data, sort_keys=False)
        if path.suffix in (".yaml", ".yml")
        else json.dumps(data, indent=2)
    )
    path.write_text(text + ("" if text.endswith("\n") else "\n"))
