"""The validated config layer: one YAML syntax, typed models from dataclasses, and errors that name the key.

Recipes (`toolvlm.recipes`) and profiles (`toolvlm.agent.profile_schema`, `toolvlm.tools.options`) are read
with `load_yaml` and checked with pydantic models that forbid unknown keys and take no lax coercions: an integer
option refuses `'abc'`, `1.5` and `true`; a number takes `3` or `1e-4`; a string refuses `3`. `model_for` turns a
typed dataclass config (nested dataclasses too) into such a model, so a config class is declared once.
`problems` turns a failed validation into one line per key: `lora.r: expected an integer, got 'abc'`.

The YAML syntax is the YAML 1.2 core schema's where PyYAML (YAML 1.1) differs: only `true`/`false` are
booleans (`no`, `off` and `yes` stay text, so `resume: no` means the string), and `1e-4` is a number. The same
reader parses command-line `key=value` values, so a file and an override mean the same thing.

This module knows nothing of what a recipe or a profile holds; it imports only pydantic and PyYAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Sequence
from typing import Any

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict

BOOL_TAG = "tag:yaml.org,2002:bool"
FLOAT_TAG = "tag:yaml.org,2002:float"
STRICT = ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=True)


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core booleans (true/false only) and numbers (`1e-4`)."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (BOOL_TAG, FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(
    BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
ConfigLoader.add_implicit_resolver(  # a dot or an exponent; plain digits stay integers (resolved first)
    FLOAT_TAG,
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$"
        r"|^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"
        r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text with `ConfigLoader` (safe: no Python objects); raises yaml.YAMLError."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (a SafeLoader subclass)


def scalar(raw: str) -> Any:
    """A command-line value read as a YAML scalar or flow collection: `8`, `1e-4`, `true`, `[bird, dog]`;
    an empty value is the empty string."""
    if not raw.strip():
        return ""
    return load_yaml(raw)


class ConfigError(ValueError):
    """A config that does not validate; `problems` holds one line per key, the text names the source too."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = f"{source}: {self.problems[0]}"
        else:
            text = f"{source}: {len(self.problems)} problems: " + "; ".join(self.problems)
        super().__init__(text)


# ---------------------------------------------------------------- dataclass -> model

_ORIGINS: dict[type[BaseModel], type] = {}  # generated model -> the dataclass it checks


@functools.cache
def model_for(cls: type) -> type[BaseModel]:
    """A strict pydantic model (unknown keys forbidden) with the fields and types of dataclass `cls`; nested
    dataclasses become nested models. Defaults stay the dataclass's own: the model only checks what is given."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        fields[f.name] = (_swap(hints[f.name]), ... if required else None)
    model = pydantic.create_model(cls.__name__, __config__=STRICT, __doc__=cls.__doc__, **fields)
    _ORIGINS[model] = cls
    return model


def _swap(hint: Any) -> Any:
    """`hint` with every dataclass in it replaced by its model."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return model_for(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_swap(a) for a in args)]  # noqa: UP007 (built from a tuple)
    if origin in (list, dict, tuple, set) and args:
        return origin[tuple(_swap(a) for a in args)] if len(args) > 1 else origin[_swap(args[0])]
    return hint


def build(cls: type, validated: BaseModel) -> Any:
    """The dataclass `cls` from a model `model_for(cls)` validated: only the keys given are passed, so the
    dataclass's defaults (and its `__post_init__` checks) apply as written."""
    return cls(**{name: _built(getattr(validated, name)) for name in validated.model_fields_set})


def _built(value: Any) -> Any:
    if isinstance(value, BaseModel) and type(value) in _ORIGINS:
        return build(_ORIGINS[type(value)], value)
    if isinstance(value, list):
        return [_built(v) for v in value]
    if isinstance(value, dict):
        return {k: _built(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------- errors -> one line per key

EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dataclass_type": "a mapping",
    "none_required": "null",
}


def problems(model: type[BaseModel], error: pydantic.ValidationError, prefix: str = "") -> list[str]:
    """One line per key of a failed validation of `model`, e.g. `lora.r: expected an integer, got 'abc'`;
    `prefix` ("tools.grounding") is put before each key path."""
    grouped: dict[tuple, list[dict[str, Any]]] = {}
    for err in error.errors(include_url=False):
        path, parent = _clean(model, err["loc"])
        grouped.setdefault(tuple(path), []).append({**err, "parent": parent})
    lines = []
    for path, errs in grouped.items():
        where = _render([prefix, *path] if prefix else path)
        lines.append(f"{where}: {_message(errs)}" if where else _message(errs))
    return lines


def _render(path: Sequence[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(errs: list[dict[str, Any]]) -> str:
    first = errs[0]
    if first["type"] == "extra_forbidden":
        parent, key = first["parent"], str(first["loc"][-1]) if first["loc"] else ""
        if parent is None:
            return "unknown key"
        close = difflib.get_close_matches(key, list(parent.model_fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key{hint}; keys are: {', '.join(parent.model_fields)}"
    if first["type"] == "missing":
        return "missing (it is required)"
    expected = []
    for err in errs:
        wanted = EXPECTED.get(err["type"]) or _lower(err["msg"]).removeprefix("input should be ")
        if wanted not in expected:
            expected.append(wanted)
    return f"expected {' or '.join(expected)}, got {_shown(first.get('input'))}"


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:]


def _shown(value: Any) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _clean(model: type[BaseModel], loc: Sequence[Any]) -> tuple[list[Any], type[BaseModel] | None]:
    """The key path of an error's `loc` without pydantic's union tags, and the model holding its last key."""
    path: list[Any] = []
    hint: Any = model
    parent: type[BaseModel] | None = None
    for part in loc:
        while True:
            origin, args = typing.get_origin(hint), typing.get_args(hint)
            if origin in (typing.Union, types.UnionType):
                members = [a for a in args if a is not type(None)]
                if len(members) == 1:
                    hint = members[0]
                    continue
                hint = next((m for m in members if _tag(m) == part), Any)
                part = None  # the tag is not a key
            break
        if part is None:
            continue
        path.append(part)
        if isinstance(hint, type) and issubclass(hint, BaseModel):
            parent = hint
            field = hint.model_fields.get(str(part))
            hint = field.annotation if field is not None else Any
        elif typing.get_origin(hint) in (list, tuple, set):
            hint = (typing.get_args(hint) or (Any,))[0]
        elif typing.get_origin(hint) is dict:
            hint = (typing.get_args(hint) or (Any, Any))[-1]
        else:
            hint = Any
    return path, parent


def _tag(hint: Any) -> str:
    """The name pydantic gives a member of a union in an error's location."""
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return hint.__name__
    if isinstance(hint, type):
        return hint.__name__
    origin = typing.get_origin(hint)
    if origin is not None:
        return f"{origin.__name__}[{','.join(_tag(a) for a in typing.get_args(hint))}]"
    return str(hint)


def validate(model: type[BaseModel], data: Any, prefix: str = "") -> tuple[BaseModel | None, list[str]]:
    """(the validated model, []) or (None, one line per problem)."""
    try:
        return model.model_validate(data), []
    except pydantic.ValidationError as err:
        return None, problems(model, err, prefix)
