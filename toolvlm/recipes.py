"""Typed dataclass configs from YAML recipes, with `key=value` overrides from the command line, validated.

One generic helper instead of a chain of `if args.x is not None`: `load_recipe(path, Config, ["lr=3e-4",
"lora.r=8"])` reads the YAML, applies the dotted overrides, checks every key against the typed dataclass
`Config` (nested dataclasses too) and builds it. Values in a file and in an override are read the same way
(`toolvlm.config`: YAML scalars, so `8`, `1e-4`, `true` and `[bird, dog]` mean what they look like). Unknown
keys and wrong types are refused with the file and the key path, e.g. `recipe.yaml: lora.r: expected an
integer, got 'abc'`, and an override names itself. `save_config` writes the resolved config next to the weights
(as nanoVLM does) so a run can be rebuilt from its folder.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from toolvlm.config import ConfigError, build, load_yaml, model_for, scalar, validate

T = TypeVar("T")

__all__ = ["ConfigError", "from_dict", "load_recipe", "merge", "parse_overrides", "save_config", "scalar"]


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> `{"a": {"b": 1}, "c": "x"}`; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise ConfigError(f"override {pair!r}", ["expected key=value, e.g. lora.r=8 or optim.lr=1e-4"])
        node = tree
        *parents, leaf = (p.strip() for p in parts)
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r}", [f"sets a key inside {part!r}, which is a value"])
        try:
            node[leaf] = scalar(raw)
        except yaml.YAMLError as err:
            problem = " ".join(str(err).split())
            raise ConfigError(f"override {pair!r}", [f"the value is not valid YAML ({problem})"]) from None
    return tree


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `update` into a copy of `base`."""
    out = dict(base)
    for key, value in update.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def from_dict(cls: type[T], data: Any, where: str = "", overrides: Sequence[str] = ()) -> T:
    """Validate `data` against dataclass `cls` (types, unknown keys, nested dataclasses) and build it; raises
    ConfigError naming `where` (a file) and each bad key, and the override that set it when one did."""
    source = where or cls.__name__
    validated, found = validate(model_for(cls), data)
    if found:
        raise ConfigError(source, [_blame(line, overrides) for line in found])
    try:
        return build(cls, validated)
    except (ValueError, TypeError) as err:  # the dataclass's own checks (__post_init__)
        raise ConfigError(source, [str(err)]) from None


def _blame(line: str, overrides: Sequence[str]) -> str:
    """`line` ("lora.r: expected ...") followed by the override that set that key, if one did."""
    path = line.partition(": ")[0]
    for pair in reversed(overrides):  # the last override of a key wins
        key = pair.partition("=")[0].strip()
        if path == key or path.startswith(key + ".") or path.startswith(key + "["):
            return f"{line} (from the override {pair!r})"
    return line


def load_recipe(path: str | Path | None, cls: type[T], overrides: Sequence[str] = ()) -> T:
    """Read a YAML recipe (or start from defaults when `path` is None), apply overrides, validate, build `cls`."""
    data: Any = {}
    source = "overrides"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe not found: {path}")
        try:
            data = load_yaml(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(source, [f"not valid YAML: {' '.join(str(err).split())}"]) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(source, [f"expected a mapping of recipe keys, got {type(data).__name__}"])
    return from_dict(cls, merge(data, parse_overrides(overrides)), source, overrides)


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
