"""Typed options of each tool in a profile's `tools:` mapping, from the tool's own constructor.

A tool declares its options once, as the typed parameters of its class (`GroundingTool(backend, model,
device, dtype, threshold, ...)`) or factory; `options_model(name)` turns that signature into a strict pydantic
model (`toolvlm.config`), so `tools.grounding.threshold: expected a number, got 'high'` and an unknown option are
refused before any model loads. Parameters a YAML file cannot give (another Tool, which `build_tools` links)
are left out; a factory taking `**kwargs` accepts other keys too; a ready Tool instance takes no options.

This module checks shapes and types only: which tools and backends exist and whether model folders are there
is `toolvlm.tools.hf.spec_problems`' job.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict

from toolvlm.config import STRICT, validate
from toolvlm.tools import registry
from toolvlm.tools.base import Tool

OPEN = ConfigDict(extra="allow", strict=True, arbitrary_types_allowed=True)


def options_model(name: str) -> type[BaseModel]:
    """The model of the options tool `name` takes (KeyError naming the tools for an unknown one)."""
    entry = registry._resolve(name)
    if isinstance(entry, Tool):
        return _empty(name)
    return _from_signature(entry)


@functools.cache
def _empty(name: str) -> type[BaseModel]:
    return pydantic.create_model(f"{name}_options", __config__=STRICT)


@functools.cache
def _from_signature(entry: Any) -> type[BaseModel]:
    """A model of the keyword parameters of a class's constructor or a factory, with their types."""
    target = entry.__init__ if isinstance(entry, type) else entry
    signature = inspect.signature(entry)
    try:
        hints = typing.get_type_hints(target)
    except (NameError, TypeError):  # annotations that do not resolve: check the names, not the types
        hints = {}
    fields: dict[str, Any] = {}
    takes_more = False
    for param in signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:
            takes_more = True
            continue
        if param.kind in (param.VAR_POSITIONAL, param.POSITIONAL_ONLY):
            continue
        hint = hints.get(param.name, Any)
        if not _from_yaml(hint):
            continue  # another tool (linked by build_tools), never written in a profile
        fields[param.name] = (hint, ... if param.default is param.empty else param.default)
    config = OPEN if takes_more else STRICT
    return pydantic.create_model(f"{getattr(entry, '__name__', 'tool')}_options", __config__=config, **fields)


def _from_yaml(hint: Any) -> bool:
    """Whether values of `hint` can be written in YAML (no Tool objects or other classes of ours)."""
    if hint is Any or hint is type(None):
        return True
    origin = typing.get_origin(hint)
    if origin is not None:
        return all(_from_yaml(a) for a in typing.get_args(hint) if a is not Ellipsis)
    return hint in (str, int, float, bool)


def option_problems(spec: Any, where: str = "tools") -> list[str]:
    """Shape and type problems of a `tools:` mapping {tool: options}, one line per key (`tools.counter.thresh:
    unknown key; keys are: ...`). The options of tools the registry does not know are left to
    `hf.spec_problems`, which names those tools."""
    if spec is None:
        return []
    if not isinstance(spec, dict):
        return [f"{where}: expected a mapping of tool name -> backend options, got {_shown(spec)}"]
    known = registry.names()
    found = []
    for name, options in spec.items():
        if options is None:
            continue
        if not isinstance(options, dict):
            found.append(
                f"{where}.{name}: expected a mapping of options (backend, model, ...), got {_shown(options)}"
            )
            continue
        if name in known:
            found += validate(options_model(name), options, prefix=f"{where}.{name}")[1]
    return found


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
