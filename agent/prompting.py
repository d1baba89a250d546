"""Prompts of the agent, read from `toolvlm.prompts/*.yaml` (package data) and filled with named variables.

A prompt file is a YAML mapping of template names to `string.Template` texts (`$tools`, `${call_open}`, ...).
`system_prompt` renders the system message for a set of tool schemas, either listing the schemas (most
backends) or leaving them to the chat template (`native=True`, the backend takes `tools=`). `openai_tools`
gives the schemas in the function-calling shape chat templates expect.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import yaml

from .protocol import CALL_CLOSE, CALL_OPEN

REQUIRED = ("system", "native_system", "tool_entry", "no_tools_system")


@lru_cache(maxsize=8)
def load_prompts(name_or_path: str = "agent") -> dict[str, str]:
    """The templates of a packaged prompt file (by name, e.g. "agent") or of a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        resource = resources.files("toolvlm.prompts").joinpath(f"{name_or_path}.yaml")
        if not resource.is_file():
            raise FileNotFoundError(
                f"no prompt file {name_or_path!r} in toolvlm.prompts (and no such YAML file)"
            )
        text = resource.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    missing = [k for k in REQUIRED if not isinstance(data, dict) or not isinstance(data.get(k), str)]
    if missing:
        raise ValueError(f"prompt file {name_or_path!r} lacks the template(s) {missing}")
    return data


def fill(template: str, **variables: Any) -> str:
    """Fill a template's $variables; a missing variable raises KeyError naming it."""
    return Template(template).substitute(variables)


def system_prompt(schemas: list[dict[str, Any]], native: bool = False, prompts: str = "agent") -> str:
    """The system message for these tool schemas ({"name", "description", "parameters"} each)."""
    templates = load_prompts(prompts)
    common = {
        "call_open": CALL_OPEN,
        "call_close": CALL_CLOSE,
        "tool_names": ", ".join(s["name"] for s in schemas),
    }
    if not schemas:
        return fill(templates["no_tools_system"], **common).strip()
    if native:
        return fill(templates["native_system"], **common).strip()
    entries = [fill(templates["tool_entry"], **entry_variables(s)) for s in schemas]
    return fill(templates["system"], tools="\n".join(entries), **common).strip()


def entry_variables(schema: dict[str, Any]) -> dict[str, str]:
    """What a `tool_entry` template may use: $schema (the JSON), $name, $description and $args (argument
    names, required first, optional ones marked with '?')."""
    parameters = schema.get("parameters", {})
    required = list(parameters.get("required", []))
    optional = [k for k in parameters.get("properties", {}) if k not in required]
    return {
        "schema": json.dumps(schema, ensure_ascii=False),
        "name": schema["name"],
        "description": schema.get("description", ""),
        "args": ", ".join(required + [f"{k}?" for k in optional]),
    }


def openai_tools(schemas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Schemas in the function-calling shape chat templates take through `tools=`."""
    return [{"type": "function", "function": s} for s in schemas]
