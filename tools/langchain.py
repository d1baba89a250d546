"""LangChain interop: our tools as langchain-core tools, and langchain-core tools as ours.

`to_langchain(tool)` gives a `StructuredTool` with `response_format="content_and_artifact"`: the content is our
`ToolOutput.content`, the artifact is the whole `ToolOutput` (images, structured artifact, error flag). Image
parameters take a PIL image or a file path, as ours do. `from_langchain(lc_tool)` wraps any langchain-core
`BaseTool` as a `Tool` (schema from its input JSON schema), ready for `registry.register`. This module only
imports langchain-core when called.
"""

from __future__ import annotations

import json
from typing import Any

from toolvlm.tools.base import Tool, ToolInputError, ToolOutput

SCHEMA_KEYS = ("type", "properties", "required", "$defs", "additionalProperties")


def to_langchain(tool: Tool) -> Any:
    """A langchain-core StructuredTool running `tool`; returns (content, ToolOutput) as content and artifact."""
    from langchain_core.tools import StructuredTool

    def run(**kwargs: Any) -> tuple[str, ToolOutput]:
        output = tool(**kwargs)
        return output.content, output

    return StructuredTool.from_function(
        func=run,
        name=tool.name,
        description=tool.description,
        args_schema=tool.inputs,
        response_format="content_and_artifact",
    )


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            c if isinstance(c, str) else c.get("text", "") if isinstance(c, dict) else str(c) for c in content
        ]
        return "\n".join(p for p in parts if p)
    return json.dumps(content, default=str)


def from_langchain(lc_tool: Any, name: str | None = None) -> Tool:
    """Wrap a langchain-core tool as a Tool (schema from the tool's input JSON schema)."""
    from langchain_core.tools import BaseTool, ToolException
    from pydantic import ValidationError

    if not isinstance(lc_tool, BaseTool):
        raise TypeError(f"from_langchain takes a langchain-core BaseTool, got {type(lc_tool).__name__}")
    full = lc_tool.get_input_jsonschema()
    inputs = {k: v for k, v in full.items() if k in SCHEMA_KEYS}
    inputs.setdefault("type", "object")
    inputs.setdefault("properties", {})
    for prop in inputs["properties"].values():
        prop.pop("title", None)

    def forward(self: Tool, **kwargs: Any) -> ToolOutput:
        call = {"type": "tool_call", "name": lc_tool.name, "args": kwargs, "id": "toolvlm"}
        try:
            message = lc_tool.invoke(call)
        except ValidationError as err:
            raise ToolInputError(
                str(err).splitlines()[0] + ": " + "; ".join(e["msg"] for e in err.errors())
            ) from None
        except ToolException as err:
            raise ToolInputError(str(err)) from None
        artifact = getattr(message, "artifact", None)
        if artifact is None:
            artifact = {}
        elif not isinstance(artifact, dict):
            artifact = {"result": artifact}
        return ToolOutput(
            content=_text(message.content), artifact=artifact, error=getattr(message, "status", "") == "error"
        )

    attrs = {
        "name": name or lc_tool.name,
        "description": lc_tool.description or lc_tool.name,
        "inputs": inputs,
        "forward": forward,
    }
    cls = type(f"{attrs['name']}_langchain_tool", (Tool,), attrs)
    instance = cls()
    instance.langchain_tool = lc_tool
    return instance
