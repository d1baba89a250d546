"""The tool registry: names -> tools, built-ins registered lazily, third-party tools by entry point.

Built-ins are recorded as "module:Class" strings, so listing tools imports only the small tool modules (no
torch, no weights). Other packages add tools through the entry-point group `toolvlm.tools`; an entry point may
name a Tool subclass, a Tool instance, or a factory returning a Tool. `build_tools(spec)` builds the tools of a
profile's `tools:` mapping and links tools that use another (the counter and the generator use the grounding
tool's detector when they have no model of their own; the generator re-counts its images with the counter).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Callable
from typing import Any

from toolvlm.tools.base import Tool

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "toolvlm.tools"
BUILTINS: dict[str, str] = {
    "grounding": "toolvlm.tools.grounding:GroundingTool",
    "captioner": "toolvlm.tools.captioner:CaptionerTool",
    "counter": "toolvlm.tools.counter:CounterTool",
    "generator": "toolvlm.tools.generator:GeneratorTool",
    "draw_boxes": "toolvlm.tools.draw:DrawBoxesTool",
}
# the order in which build_tools builds, so that a tool's dependencies exist before it
BUILD_ORDER = ["grounding", "captioner", "counter", "generator", "draw_boxes"]

Entry = str | type[Tool] | Tool | Callable[..., Tool] | importlib.metadata.EntryPoint
_entries: dict[str, Entry] = dict(BUILTINS)
_entry_points_loaded = False


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _entries:
            log.warning("entry point %s (%s) ignored: a tool of that name exists", ep.name, ep.value)
            continue
        _entries[ep.name] = ep


def register(tool: Entry, name: str | None = None, *, replace: bool = False) -> str:
    """Register a Tool instance, Tool subclass, factory or "module:attr" string; returns its name."""
    if isinstance(tool, Tool) or (isinstance(tool, type) and issubclass(tool, Tool)):
        name = name or tool.name
    if not name:
        raise ValueError("register: give a name (the tool has none)")
    _load_entry_points()
    if name in _entries and not replace:
        raise ValueError(f"a tool named {name!r} is registered already; pass replace=True to replace it")
    _entries[name] = tool
    return name


def unregister(name: str) -> None:
    """Remove a tool (built-ins come back only with register)."""
    _entries.pop(name, None)


def names() -> list[str]:
    """Names of all registered tools, built-ins first."""
    _load_entry_points()
    return list(_entries)


def _resolve(name: str) -> Any:
    _load_entry_points()
    if name not in _entries:
        raise KeyError(f"unknown tool {name!r}; tools are: {', '.join(_entries)}")
    entry = _entries[name]
    if isinstance(entry, importlib.metadata.EntryPoint):
        entry = entry.load()
    elif isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
    return entry


def get(name: str, **options: Any) -> Tool:
    """A tool instance by name; options (backend, model, device, dtype, ...) go to its constructor."""
    entry = _resolve(name)
    if isinstance(entry, Tool):
        if options:
            raise ValueError(
                f"tool {name!r} is a ready instance and takes no options (got {sorted(options)})"
            )
        return entry
    made = entry(**options)
    if not isinstance(made, Tool):
        raise TypeError(f"the factory of tool {name!r} returned {type(made).__name__}, not a Tool")
    return made


def schema(name: str) -> dict[str, Any]:
    """A tool's schema without building it (no weights are loaded)."""
    entry = _resolve(name)
    if isinstance(entry, Tool) or (isinstance(entry, type) and issubclass(entry, Tool)):
        return {"name": name, "description": entry.description, "parameters": entry.inputs}
    return {**get(name).schema(), "name": name}


def list_tools() -> list[dict[str, Any]]:
    """Schemas of all registered tools: [{"name", "description", "parameters"}, ...]."""
    return [schema(n) for n in names()]


def backends(name: str) -> list[str] | None:
    """The backend names a built-in tool accepts (None for a tool without a backend option); no weights load."""
    if name in ("grounding", "counter"):
        from toolvlm.tools.detectors import DETECTORS

        return list(DETECTORS)
    if name == "captioner":
        from toolvlm.tools.captioner import GROUNDED, Captioner

        return [*Captioner.model_types, GROUNDED]
    if name == "generator":
        from toolvlm.tools.image_backends import BACKENDS

        return list(BACKENDS)
    return None


def build_tools(spec: dict[str, dict[str, Any] | None]) -> dict[str, Tool]:
    """Build the tools of a spec {name: options}; raises on unknown tools or backends."""
    spec = {name: dict(options or {}) for name, options in spec.items()}
    known = names()
    unknown = [n for n in spec if n not in known]
    if unknown:
        raise KeyError(f"unknown tool(s) {unknown} in the tools spec; tools are: {', '.join(known)}")
    order = [n for n in BUILD_ORDER if n in spec] + [n for n in spec if n not in BUILD_ORDER]
    tools: dict[str, Tool] = {}
    for name in order:
        options = spec[name]
        if name == "generator" and "counter" in tools and "counter" not in options:
            options["counter"] = tools["counter"]  # re-counts what it generated
        shares_detector = name == "counter" or (name == "captioner" and options.get("backend") == "grounded")
        if (shares_detector or name == "generator") and "grounding" in tools and "grounding" not in options:
            grounding = tools["grounding"]
            if name == "generator":
                options["grounding"] = grounding
            elif "model" not in options:
                if name == "counter":
                    options.setdefault("backend", getattr(grounding, "backend", "inhouse"))
                options["grounding"] = grounding
        tools[name] = get(name, **options)
    return {name: tools[name] for name in spec}
