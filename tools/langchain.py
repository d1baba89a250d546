"""LangChain interop: our tools as langchain-core tools, and langchain-core tools as ours.

`to_langchain(tool)` gives a `StructuredTool` that behaves as LangChain expects of a well-made tool:

- Its `args_schema` is a pydantic model built from the tool's JSON input schema (`args_model`): types,
  required and optional arguments, defaults, enums, descriptions, bounds of numbers, lengths of strings and
  arrays, nested objects and local `$ref`s (recursive schemas are refused). LangChain validates a call against
  it and raises a `ValidationError` before our tool runs; unknown arguments are refused. Image parameters (`{"type": "string", "format": "image"}`) take a file path, a data
  URL (`data:image/png;base64,...`) or a PIL image; a data URL is decoded during validation.
- `response_format="content_and_artifact"`: the content is a list of langchain-core standard content blocks,
  `{"type": "text", "text": ...}` with our `ToolOutput.content` and one
  `{"type": "image", "base64": ..., "mime_type": "image/png"}` per image the tool made, so a `ToolMessage`
  carries the images to a multimodal chat model; the artifact is the whole `ToolOutput`.
- A tool's input error (`ToolOutput(error=True)`, or a `ToolInputError` it raised) is raised as a
  `ToolException` with `handle_tool_error=True`: invoked with a `ToolCall`, the tool returns a `ToolMessage`
  with `status="error"` and the error text as its content (langchain-core attaches no artifact to an error).
  Bugs and missing weights raise as they do in our tools.

`from_langchain(lc_tool)` wraps any langchain-core `BaseTool` as a `Tool` (schema from its input JSON schema),
ready for `registry.register`: a `ToolMessage` with `status="error"` or a `ToolException` becomes
`ToolOutput(error=True)`, text blocks become the content and image blocks become images (the artifact of a tool
made by `to_langchain` is taken back whole).

This module knows the two tool contracts and the JSON-schema subset our tools declare; it imports langchain-core
only when called and neither the agent nor the VLM.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, create_model

from toolvlm.tools.base import IMAGE_FORMAT, Tool, ToolInputError, ToolOutput
from toolvlm.tools.mcp_server import decode_image, png_base64

SCHEMA_KEYS = ("type", "properties", "required", "$defs", "additionalProperties")
IMAGE_NOTE = "a file path or a data URL (data:image/png;base64,...)"
_HANDLE_NOTE = re.compile(r"\s*\([^()]*\bimg_\d+\)")  # "(a handle such as img_0)" in our descriptions
MAX_DEPTH = 32  # schemas nested (or $refs followed) deeper than this are taken for recursive ones and refused
_PRIMITIVES: dict[str, Any] = {"string": str, "integer": int, "number": float, "boolean": bool, "null": None}
_BOUNDS = {
    "minimum": "ge",
    "maximum": "le",
    "exclusiveMinimum": "gt",
    "exclusiveMaximum": "lt",
    "multipleOf": "multiple_of",
    "minLength": "min_length",
    "maxLength": "max_length",
    "pattern": "pattern",
    "minItems": "min_length",
    "maxItems": "max_length",
}


# ---------------------------------------------------------------- JSON schema -> pydantic model


def _image_argument(value: Any) -> Any:
    """An image argument as our tools take it: a PIL image or a path; a data URL is decoded here."""
    if isinstance(value, Image.Image | Path):
        return value
    if isinstance(value, str):
        return decode_image(value)  # a ValueError (bad base64, not an image) is a validation error
    raise ValueError(f"an image must be {IMAGE_NOTE} or a PIL image, got {type(value).__name__}")


def _not_bool(value: Any) -> Any:
    """Refuse booleans where JSON schema asks for a number (pydantic's lax mode would take True as 1)."""
    if isinstance(value, bool):
        raise ValueError("a number is required, not a boolean")
    return value


ImageArgument = Annotated[
    Any, BeforeValidator(_image_argument), WithJsonSchema({"type": "string", "format": IMAGE_FORMAT})
]


def _resolve(prop: dict[str, Any], root: dict[str, Any], depth: int) -> dict[str, Any]:
    """Follow a local `$ref` (`#/$defs/Name` or `#/definitions/Name`) to the schema it names."""
    while "$ref" in prop:
        if depth > MAX_DEPTH:
            raise ValueError(f"schema $ref {prop['$ref']!r} nests more than {MAX_DEPTH} levels (recursive?)")
        ref = prop["$ref"]
        if not ref.startswith("#/"):
            raise ValueError(f"schema $ref {ref!r} is not local (only '#/$defs/...' refs are supported)")
        target: Any = root
        for part in ref[2:].split("/"):
            if not isinstance(target, dict) or part not in target:
                raise ValueError(f"schema $ref {ref!r} names nothing in the schema")
            target = target[part]
        prop = {**target, **{k: v for k, v in prop.items() if k != "$ref"}}
        depth += 1
    return prop


def _constraints(prop: dict[str, Any]) -> dict[str, Any]:
    """pydantic Field arguments for the bounds a schema gives (numbers, string and array lengths)."""
    return {_BOUNDS[k]: v for k, v in prop.items() if k in _BOUNDS}


def field_type(
    prop: dict[str, Any], root: dict[str, Any] | None = None, depth: int = 0, describe: bool = True
) -> Any:
    """The pydantic type of one property of a JSON schema, with its bounds (and its description unless
    `describe` is False: a model field carries it on the field instead)."""
    root = prop if root is None else root
    prop = _resolve(prop, root, depth)
    if depth > MAX_DEPTH:
        raise ValueError(f"schema nests more than {MAX_DEPTH} levels")
    extra = _constraints(prop)
    if describe and "description" in prop:
        extra["description"] = prop["description"]
    metadata: list[Any] = [Field(**extra)] if extra else []
    kinds = set(prop["type"]) if isinstance(prop.get("type"), list) else {prop.get("type")}
    if kinds & {"integer", "number"} and "boolean" not in kinds:
        metadata.append(BeforeValidator(_not_bool))  # after the bounds, or pydantic cannot render them
    kind = _base_type(prop, root, depth)
    return Annotated[(kind, *metadata)] if metadata else kind


def _base_type(prop: dict[str, Any], root: dict[str, Any], depth: int) -> Any:
    if prop.get("format") == IMAGE_FORMAT:
        return ImageArgument
    if "const" in prop:
        return Literal[prop["const"]]
    if "enum" in prop:
        return Literal[tuple(prop["enum"])]
    for key in ("anyOf", "oneOf"):
        if key in prop:
            return _union([field_type(p, root, depth + 1) for p in prop[key]])
    kind = prop.get("type")
    if isinstance(kind, list):
        return _union([_base_type({**prop, "type": k}, root, depth) for k in kind])
    if kind in _PRIMITIVES:
        return _PRIMITIVES[kind]
    if kind == "array":
        items = prop.get("items")
        return list[field_type(items, root, depth + 1)] if isinstance(items, dict) else list[Any]
    if kind == "object":
        return _object_type(prop, root, depth)
    if kind is None:
        return Any
    raise ValueError(f"unsupported JSON schema type {kind!r}")


def _union(types: list[Any]) -> Any:
    return typing.Union[tuple(types)] if len(types) > 1 else types[0]  # noqa: UP007 (a runtime list of types)


def _object_type(prop: dict[str, Any], root: dict[str, Any], depth: int) -> Any:
    if prop.get("properties"):
        return _model(prop.get("title", "Object"), prop, root, depth + 1)
    values = prop.get("additionalProperties")
    return dict[str, field_type(values, root, depth + 1)] if isinstance(values, dict) else dict[str, Any]


def _model(name: str, schema: dict[str, Any], root: dict[str, Any], depth: int) -> type[BaseModel]:
    """A pydantic model of an object schema; unknown keys refused unless `additionalProperties` allows them."""
    required = set(schema.get("required", []))
    fields: dict[str, Any] = {}
    for key, prop in schema.get("properties", {}).items():
        kind = field_type(prop, root, depth, describe=False)
        description = _resolve(prop, root, depth).get("description")
        if key in required:
            fields[key] = (kind, Field(..., description=description))
        elif "default" in prop:
            fields[key] = (kind, Field(default=prop["default"], description=description))
        else:  # left out or null: our tools take None as "not given"
            fields[key] = (kind | None, Field(default=None, description=description))
    # the arguments themselves: unknown ones refused, as our tools do; nested objects: JSON schema's default
    allowed = schema.get("additionalProperties", depth > 0)
    extra = "forbid" if allowed is False else "allow"
    return create_model(_class_name(name), __config__=ConfigDict(extra=extra), **fields)


def _class_name(name: str) -> str:
    return (
        "".join(part[:1].upper() + part[1:] for part in name.replace("-", "_").split("_") if part) or "Args"
    )


def args_model(tool: Tool) -> type[BaseModel]:
    """The pydantic model of a tool's input schema (LangChain's `args_schema`); its image parameters take a
    file path, a data URL or a PIL image, and their descriptions say so."""
    inputs = dict(tool.inputs)
    properties = {}
    for key, prop in inputs.get("properties", {}).items():
        if isinstance(prop, dict) and prop.get("format") == IMAGE_FORMAT:  # no handles (img_0) here
            described = _HANDLE_NOTE.sub("", prop.get("description", "the image"))
            prop = {**prop, "description": f"{described}: {IMAGE_NOTE}"}
        properties[key] = prop
    inputs["properties"] = properties
    try:
        return _model(f"{tool.name}_input", inputs, inputs, 0)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"tool {tool.name!r}: cannot turn its input schema into a pydantic model: {err}"
        ) from err


# ---------------------------------------------------------------- our tools as LangChain tools


def content_blocks(output: ToolOutput) -> list[dict[str, Any]]:
    """langchain-core standard content blocks of a ToolOutput: its text, then each image as base64 PNG."""
    blocks: list[dict[str, Any]] = [{"type": "text", "text": output.content}]
    blocks += [{"type": "image", "base64": png_base64(im), "mime_type": "image/png"} for im in output.images]
    return blocks


def _plain(value: Any) -> Any:
    """Validated arguments back to plain data for our tool: a nested object as a dict of the keys given (no
    None filled in for the optional ones left out)."""
    if isinstance(value, BaseModel):
        return {k: _plain(getattr(value, k)) for k in value.model_fields_set}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def to_langchain(tool: Tool) -> Any:
    """A langchain-core StructuredTool running `tool`: a pydantic args schema, content blocks (text and images)
    as content, the ToolOutput as artifact, and input errors as `ToolException` (`status="error"`)."""
    from langchain_core.tools import StructuredTool, ToolException

    def run(**kwargs: Any) -> tuple[list[dict[str, Any]], ToolOutput]:
        output = tool(**{k: _plain(v) for k, v in kwargs.items()})  # a ToolInputError becomes error=True
        if output.error:
            raise ToolException(output.content)
        return content_blocks(output), output

    return StructuredTool.from_function(
        func=run,
        name=tool.name,
        description=tool.description,
        args_schema=args_model(tool),
        response_format="content_and_artifact",
        handle_tool_error=True,
    )


# ---------------------------------------------------------------- LangChain tools as ours


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            c if isinstance(c, str) else c.get("text", "") if isinstance(c, dict) else str(c) for c in content
        ]
        return "\n".join(p for p in parts if p)
    return json.dumps(content, default=str)


def _block_image(block: Any) -> Image.Image | None:
    """The image of a standard image block (base64, or a data URL in `url`/`image_url`), else None."""
    if not isinstance(block, dict) or block.get("type") not in ("image", "image_url"):
        return None
    data = block.get("base64") or block.get("data")
    url = block.get("url") or block.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if data is None and isinstance(url, str) and url.startswith("data:"):
        data = url.partition(",")[2]
    if not isinstance(data, str):
        return None  # an image by reference (a web URL or a file id): not fetched here
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as opened:
            opened.load()
            return opened.copy()
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as err:  # the LangChain tool's bug
        raise ValueError(f"an image block that does not decode to an image: {err}") from None


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
        error = getattr(message, "status", "") == "error"
        artifact = getattr(message, "artifact", None)
        if isinstance(artifact, ToolOutput):  # one of ours, through to_langchain: taken back whole
            return artifact
        content = getattr(message, "content", message)
        images = []
        if isinstance(content, list):
            decoded = [(block, _block_image(block)) for block in content]
            images = [image for _, image in decoded if image is not None]
            content = [block for block, image in decoded if image is None]
        text = _text(content)
        if artifact is None:
            artifact = {}
        elif not isinstance(artifact, dict):
            artifact = {"result": artifact}
        return ToolOutput(content=text, images=images, artifact=artifact, error=error)

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
