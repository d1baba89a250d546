"""The tool contract: `ToolOutput`, `Tool` and the `@tool` decorator.

A tool declares a name, a description and a JSON schema of its inputs; the schema is checked against the
`forward` signature when the class is defined, so a mismatch fails at import, not mid-conversation.
`Tool.__call__` validates and coerces arguments, loads heavy models lazily (`setup()`, once), and turns bad
input (a `ToolInputError`, raised by validation or by `forward`) into `ToolOutput(error=True)` whose text says
what to change. Anything else (a bug, a missing file of weights) raises.

This module knows nothing about models, backends or the registry. Image-valued parameters are declared as
`{"type": "string", "format": "image"}`: the agent resolves handles (`img_0`) to PIL images before calling;
at call time such a parameter accepts a PIL image or a path to an image file.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import jsonschema
from PIL import Image

IMAGE_FORMAT = "image"


class ToolInputError(ValueError):
    """Bad input from the caller (the model or a user); becomes `ToolOutput(error=True)` with this text."""


class MissingWeightsError(FileNotFoundError):
    """Model weights (of a tool or the VLM) are not configured or not found; an infrastructure failure, so it
    raises. The one such error of toolvlm (`toolvlm.vlm.base_lm` re-exports it)."""


@dataclass
class ToolOutput:
    """What a tool returns: a short text for the model, the images it made, and structured data."""

    content: str
    images: list[Image.Image] = field(default_factory=list)
    artifact: dict[str, Any] = field(default_factory=dict)
    error: bool = False

    def to_dict(self, image_paths: list[str] | None = None) -> dict[str, Any]:
        """A JSON-serialisable view; images are given as paths when they have been written."""
        return {
            "content": self.content,
            "artifact": self.artifact,
            "images": list(image_paths) if image_paths is not None else [f"<image {i}>" for i in self.images],
            "error": self.error,
        }


def image_parameters(inputs: dict[str, Any]) -> list[str]:
    """Names of the image-valued parameters of an input schema."""
    props = inputs.get("properties", {})
    return [k for k, v in props.items() if isinstance(v, dict) and v.get("format") == IMAGE_FORMAT]


def check_signature(name: str, forward: typing.Callable, inputs: dict[str, Any]) -> None:
    """Raise TypeError when `forward`'s parameters differ from the declared `inputs` (names both sets)."""
    jsonschema.Draft202012Validator.check_schema(inputs)
    if inputs.get("type") != "object":
        raise TypeError(
            f"tool {name!r}: inputs must be a JSON schema of type 'object', got {inputs.get('type')!r}"
        )
    params = [p for p in inspect.signature(forward).parameters.values() if p.name != "self"]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return  # forward(**kwargs) takes whatever the schema declares
    declared = set(inputs.get("properties", {}))
    taken = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if declared != taken:
        raise TypeError(
            f"tool {name!r}: forward() parameters {sorted(taken)} differ from declared inputs {sorted(declared)}"
        )
    required = set(inputs.get("required", []))
    no_default = {p.name for p in params if p.default is p.empty}
    if no_default - required:
        raise TypeError(
            f"tool {name!r}: forward() parameters without a default {sorted(no_default)} "
            f"must be listed as required in inputs (required: {sorted(required)})"
        )


class Tool:
    """A callable tool: declared inputs, lazy setup, validated calls returning `ToolOutput`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    inputs: ClassVar[dict[str, Any]] = {"type": "object", "properties": {}}
    output_type: ClassVar[str] = "tool_output"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__ or "inputs" in cls.__dict__:
            check_signature(cls.name or cls.__name__, cls.forward, cls.inputs)

    def __init__(self, device: str = "cpu", dtype: str = "float32") -> None:
        self.device = device
        self.dtype = dtype
        self.is_setup = False

    def setup(self) -> None:
        """Load heavy models; called once, on the first call."""

    def forward(self, **kwargs: Any) -> ToolOutput:
        """Do the work on validated arguments."""
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        """The function-calling schema: name, description and JSON-schema parameters."""
        return {"name": self.name, "description": self.description, "parameters": self.inputs}

    def error(self, message: str) -> ToolOutput:
        """A ToolOutput reporting bad input."""
        return ToolOutput(content=f"{self.name}: {message}", error=True)

    def __call__(self, **kwargs: Any) -> ToolOutput:
        try:
            arguments = self.validate(kwargs)
        except ToolInputError as err:
            return self.error(str(err))
        if not self.is_setup:
            self.setup()
            self.is_setup = True
        try:
            output = self.forward(**arguments)
        except ToolInputError as err:
            return self.error(str(err))
        if not isinstance(output, ToolOutput):
            raise TypeError(f"tool {self.name!r}: forward() returned {type(output).__name__}, not ToolOutput")
        return output

    def validate(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Check and coerce arguments against the schema; raise ToolInputError saying what to change."""
        return validate_arguments(self.inputs, kwargs)


# longest text argument taken (a tool's schema may set its own maxLength): longer is a mistake or an attack
MAX_TEXT_CHARS = 10_000


def describe_arguments(inputs: dict[str, Any]) -> str:
    """A short list of a schema's arguments with their types, required ones marked."""
    required = set(inputs.get("required", []))
    props: dict[str, Any] = inputs.get("properties", {})
    out = [f"{k} ({_type_name(v)}{', required' if k in required else ''})" for k, v in props.items()]
    return ", ".join(out) or "none"


def validate_arguments(
    inputs: dict[str, Any],
    arguments: Any,
    image: typing.Callable[[str, Any], Image.Image] | None = None,
) -> dict[str, Any]:
    """The one argument check of toolvlm (tools and the agent loop): check `arguments` against a tool's input
    schema, coerce lenient strings ("0.3" for a number), and turn image-valued ones into images with
    `image(key, value)` (default: a PIL image or a file path; the loop resolves handles). Raises
    ToolInputError saying what to change; the caller adds the tool's name."""
    props: dict[str, Any] = inputs.get("properties", {})
    expected = describe_arguments(inputs)
    if not isinstance(arguments, dict):
        raise ToolInputError(
            f"arguments must be a JSON object, got {type(arguments).__name__}; arguments are: {expected}"
        )
    unknown = sorted(str(k) for k in set(arguments) - set(props))
    if unknown:
        raise ToolInputError(f"unknown argument(s) {unknown}; arguments are: {expected}")
    missing = [k for k in inputs.get("required", []) if k not in arguments or arguments[k] is None]
    if missing:
        raise ToolInputError(f"missing required argument(s) {missing}; arguments are: {expected}")
    images = image_parameters(inputs)
    load = image or _coerce_image
    out: dict[str, Any] = {}
    for key, value in arguments.items():
        if value is None:
            continue  # an optional argument left out
        if key in images:
            out[key] = load(key, value)
            continue
        out[key] = _coerce(value, props[key])
        _check_sane(key, out[key], props[key])
    checked = {k: v for k, v in out.items() if k not in images}
    schema = {**inputs, "properties": {k: v for k, v in props.items() if k not in images}}
    schema["required"] = [k for k in inputs.get("required", []) if k not in images]
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(checked), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        where = "argument " + repr(".".join(str(p) for p in err.path)) if err.path else "arguments"
        message = err.message if len(err.message) <= 300 else err.message[:300] + "..."
        raise ToolInputError(f"{where}: {message}; arguments are: {expected}")
    return out


def _check_sane(key: str, value: Any, prop: dict[str, Any], depth: int = 0) -> None:
    """Refuse what a JSON schema lets through but no tool can use: NaN or infinite numbers, huge texts."""
    if depth > 20:
        raise ToolInputError(f"argument {key!r} is nested more than 20 levels deep")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolInputError(f"argument {key!r} must be a finite number, got {value}")
    if isinstance(value, str) and len(value) > prop.get("maxLength", MAX_TEXT_CHARS):
        raise ToolInputError(
            f"argument {key!r} is {len(value)} characters long; at most {prop.get('maxLength', MAX_TEXT_CHARS)}"
        )
    if isinstance(value, dict):
        for item in value.values():
            _check_sane(key, item, {}, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_sane(key, item, {}, depth + 1)


def _type_name(prop: dict[str, Any]) -> str:
    if prop.get("format") == IMAGE_FORMAT:
        return "image handle"
    if "enum" in prop:
        return "one of " + "/".join(map(str, prop["enum"]))
    kind = prop.get("type", "any")
    return "/".join(kind) if isinstance(kind, list) else str(kind)


def _coerce_image(key: str, value: Any) -> Image.Image:
    from toolvlm.tools import imaging  # imaging imports this module

    if isinstance(value, Image.Image | str | Path):
        return imaging.load_image(value)
    raise ToolInputError(
        f"argument {key!r} must be an image (a handle such as 'img_0' or a file path), got {type(value).__name__}"
    )


def _coerce(value: Any, prop: dict[str, Any]) -> Any:
    """Lenient conversions of strings (from a command line or a model) to the declared type."""
    kind = prop.get("type")
    kinds = set(kind) if isinstance(kind, list) else {kind}
    if not isinstance(value, str) or "string" in kinds:
        if isinstance(value, tuple):
            return [_coerce(v, prop.get("items", {})) for v in value]
        if isinstance(value, list) and isinstance(prop.get("items"), dict):
            return [_coerce(v, prop["items"]) for v in value]
        if isinstance(value, int) and not isinstance(value, bool) and kinds == {"number"}:
            return float(value)
        return value
    text = value.strip()
    if kinds & {"integer", "number"} and re.fullmatch(r"[-+]?\d+(\.\d*)?([eE][-+]?\d+)?", text):
        number = float(text)
        return int(number) if "integer" in kinds and number.is_integer() else number
    if "boolean" in kinds and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if kinds & {"array", "object"}:
        try:
            return _coerce(json.loads(text), prop)
        except (json.JSONDecodeError, RecursionError):
            return value
    return value


# ---------------------------------------------------------------- @tool: a typed function becomes a Tool

_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}


def json_schema_for(annotation: Any) -> dict[str, Any]:
    """The JSON schema of a Python type hint (str, int, float, bool, list[...], dict[...], Literal, images)."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        return json_schema_for(args[0]) if len(args) == 1 else {"anyOf": [json_schema_for(a) for a in args]}
    if origin is Literal:
        return {"enum": list(typing.get_args(annotation))}
    if annotation is Image.Image or (isinstance(annotation, type) and issubclass(annotation, Image.Image)):
        return {"type": "string", "format": IMAGE_FORMAT}
    if origin in (list, tuple) or annotation in (list, tuple):
        return {"type": "array", "items": json_schema_for(args[0])} if args else {"type": "array"}
    if origin is dict:
        return (
            {"type": "object", "additionalProperties": json_schema_for(args[1])}
            if args
            else {"type": "object"}
        )
    if annotation in _SIMPLE:
        return {"type": _SIMPLE[annotation]}
    if annotation is Any or annotation is inspect.Parameter.empty:
        return {}
    raise TypeError(f"no JSON schema for type hint {annotation!r}")


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into (description, {argument: description})."""
    lines = inspect.cleandoc(doc or "").splitlines()
    description, args, current, section = [], {}, None, None
    for line in lines:
        header = line.strip().rstrip(":").lower()
        if line.strip().endswith(":") and header in ("args", "arguments", "parameters", "returns", "raises"):
            section = header
            continue
        if section is None:
            description.append(line)
        elif section in ("args", "arguments", "parameters"):
            match = re.match(r"^\s{0,8}(\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", line)
            if match and (not line.startswith(" " * 8)):
                current = match.group(1)
                args[current] = match.group(3).strip()
            elif current and line.strip():
                args[current] = (args[current] + " " + line.strip()).strip()
    return "\n".join(description).strip(), args


def _wrap_result(result: Any) -> ToolOutput:
    if isinstance(result, ToolOutput):
        return result
    if isinstance(result, Image.Image):
        return ToolOutput(content="made 1 image", images=[result])
    if isinstance(result, dict):
        return ToolOutput(content=json.dumps(result, default=str), artifact=result)
    return ToolOutput(content=str(result), artifact={"result": result} if _jsonable(result) else {})


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def tool(
    fn: typing.Callable | None = None, *, name: str | None = None, description: str | None = None
) -> Any:
    """Turn a typed, docstringed function into a Tool instance (usable as `@tool` or `@tool(name=...)`)."""

    def make(func: typing.Callable) -> Tool:
        hints = typing.get_type_hints(func)
        doc, arg_docs = parse_docstring(func.__doc__ or "")
        properties, required = {}, []
        for param in inspect.signature(func).parameters.values():
            prop = json_schema_for(hints.get(param.name, inspect.Parameter.empty))
            if param.name in arg_docs:
                prop["description"] = arg_docs[param.name]
            properties[param.name] = prop
            if param.default is param.empty:
                required.append(param.name)
            elif param.default is not None and _jsonable(param.default):
                prop["default"] = param.default
        inputs = {"type": "object", "properties": properties, "required": required}
        tool_name = name or func.__name__
        if not (description or doc):
            raise TypeError(f"tool {tool_name!r}: give the function a docstring (it becomes the description)")

        def forward(self: Tool, **kwargs: Any) -> ToolOutput:
            return _wrap_result(func(**kwargs))

        attrs = {"name": tool_name, "description": description or doc, "inputs": inputs, "forward": forward}
        cls = type(f"{tool_name}_tool", (Tool,), attrs)
        instance = cls()
        instance.__wrapped__ = func
        return instance

    return make(fn) if fn is not None else make
