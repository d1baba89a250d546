"""LangChain interop: our tools as langchain-core tools (a pydantic args schema that refuses bad input before
the tool runs, errors as `status="error"` tool messages, images as standard image content blocks), and
langchain-core tools registered as ours."""

from __future__ import annotations

import base64
import io
import json
import runpy
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import ToolMessage, convert_to_openai_messages
from langchain_core.tools import ToolException
from langchain_core.tools import tool as lc_tool
from PIL import Image
from pydantic import ValidationError

from toolvlm.tools import Tool, ToolInputError, ToolOutput, registry
from toolvlm.tools.draw import DrawBoxesTool
from toolvlm.tools.grounding import GroundingTool
from toolvlm.tools.langchain import args_model, from_langchain, to_langchain
from toolvlm.tools.mcp_server import png_base64

pytest_plugins = ["fixtures_tools"]  # fixtures: scene, tiny_models, scene_path


@lc_tool(response_format="content_and_artifact")
def word_count(text: str, minimum: int = 1) -> tuple[str, dict]:
    """Count the words of a text that are at least `minimum` letters long."""
    words = [w for w in text.split() if len(w) >= minimum]
    return f"{len(words)} words", {"count": len(words)}


@lc_tool
def shout(text: str) -> str:
    """Upper-case a text."""
    if not text:
        raise ToolException("nothing to shout; give some text")
    return text.upper()


shout.handle_tool_error = True


class Measure(Tool):
    """A tool that records what reaches it: a size, a mode, a box, a nested option object and an image."""

    name = "measure"
    description = "Measure a region of an image."
    inputs = {
        "type": "object",
        "properties": {
            "image": {"type": "string", "format": "image", "description": "the image"},
            "size": {"type": "integer", "minimum": 1, "maximum": 64, "description": "a size in pixels"},
            "ratio": {"type": "number", "exclusiveMinimum": 0, "default": 0.5},
            "mode": {"enum": ["fast", "exact"], "description": "how to measure"},
            "box": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
            "options": {"$ref": "#/$defs/Options"},
            "note": {"type": "string", "maxLength": 8},
        },
        "required": ["image", "size"],
        "$defs": {
            "Options": {
                "type": "object",
                "properties": {"label": {"type": "string"}, "weight": {"type": "number"}},
                "required": ["label"],
                "additionalProperties": False,
            }
        },
    }

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def forward(
        self,
        image: Image.Image,
        size: int,
        ratio: float = 0.5,
        mode: str = "fast",
        box: list[float] | None = None,
        options: dict | None = None,
        note: str | None = None,
    ) -> ToolOutput:
        self.calls.append({"image": image, "size": size, "ratio": ratio, "mode": mode, "options": options})
        if size == 13:
            raise ToolInputError("size 13 is unlucky; pick another")
        return ToolOutput(content=f"{size}px {mode} on {image.width}x{image.height}", artifact={"size": size})


KEPT_KEYWORDS = ("type", "enum", "minimum", "maximum", "maxLength", "minItems", "maxItems", "format")


def _call(lc: Any, args: dict[str, Any], call_id: str = "1") -> Any:
    return lc.invoke({"type": "tool_call", "name": lc.name, "id": call_id, "args": args})


def _decode(block: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(block["base64"])))


def test_langchain_tool_registered_into_the_registry_runs():
    wrapped = from_langchain(word_count)
    assert wrapped.schema()["parameters"]["required"] == ["text"]
    assert wrapped.schema()["parameters"]["properties"]["minimum"]["type"] == "integer"
    name = registry.register(wrapped)
    try:
        out = registry.get("word_count")(text="a bb ccc", minimum=2)
        assert out == ToolOutput(content="2 words", artifact={"count": 2})
        assert registry.get("word_count")(text=5).error  # our schema check, before LangChain sees it
        assert any(s["name"] == "word_count" for s in registry.list_tools())
    finally:
        registry.unregister(name)


def test_langchain_plain_tool_and_tool_errors():
    wrapped = from_langchain(shout)
    assert wrapped(text="hi") == ToolOutput(content="HI")
    failed = wrapped(text="")
    assert failed.error and "nothing to shout" in failed.content


@pytest.mark.parametrize(
    ("args", "where"),
    [
        ({"size": 4}, "image"),  # a required argument missing
        ({"image": "x.png"}, "size"),
        ({"image": "x.png", "size": "four"}, "size"),  # wrong type
        ({"image": "x.png", "size": True}, "size"),  # a boolean is no number
        ({"image": "x.png", "size": 65}, "size"),  # above the maximum
        ({"image": "x.png", "size": 4, "ratio": 0}, "ratio"),  # not above the exclusive minimum
        ({"image": "x.png", "size": 4, "mode": "slow"}, "mode"),  # not in the enum
        ({"image": "x.png", "size": 4, "box": [1, 2, 3]}, "box"),  # three numbers for a box of four
        ({"image": "x.png", "size": 4, "note": "far too long"}, "note"),  # above maxLength
        ({"image": "x.png", "size": 4, "options": {"weight": 1}}, "options.label"),  # nested required ($ref)
        ({"image": "x.png", "size": 4, "options": {"label": "a", "x": 1}}, "options.x"),  # nested unknown key
        ({"image": "x.png", "size": 4, "colour": "red"}, "colour"),  # unknown argument
        ({"image": 7, "size": 4}, "image"),  # an image is a path, a data URL or a PIL image
        ({"image": "data:image/png;base64,bm90IGFuIGltYWdl", "size": 4}, "image"),  # a data URL of no image
    ],
)
def test_args_schema_rejects_bad_input_before_the_tool_runs(args, where):
    ours = Measure()
    lc = to_langchain(ours)
    with pytest.raises(ValidationError) as caught:
        _call(lc, args)
    assert any(".".join(map(str, e["loc"])) == where for e in caught.value.errors()), caught.value.errors()
    assert ours.calls == [] and not ours.is_setup


def test_args_schema_accepts_good_input_and_applies_defaults(scene, scene_path):
    ours = Measure()
    lc = to_langchain(ours)
    image = scene(40, 30)
    data_url = "data:image/png;base64," + png_base64(image)
    options = [{"label": "a", "weight": 2}, {"label": "b"}, None]
    for source, option in zip((str(scene_path), image, data_url), options, strict=True):
        message = _call(lc, {"image": source, "size": "8", "options": option})
        assert message.status == "success", message.content
    assert [c["size"] for c in ours.calls] == [8, 8, 8]  # "8" coerced to an integer
    assert [c["ratio"] for c in ours.calls] == [0.5] * 3  # the schema's default
    # nested objects arrive as plain dicts of what was given (no None for the weight left out)
    assert [c["options"] for c in ours.calls] == [{"label": "a", "weight": 2.0}, {"label": "b"}, None]
    assert [c["image"].size for c in ours.calls] == [(160, 120), (40, 30), (40, 30)]
    assert list(ours.calls[2]["image"].getdata()) == list(image.getdata())  # the data URL decoded exactly


def test_args_schema_renders_every_registered_tools_schema():
    for name in registry.names():
        tool = registry.get(name)
        rendered = args_model(tool).model_json_schema()
        declared = tool.inputs["properties"]
        assert list(rendered["properties"]) == list(declared), name
        assert sorted(rendered.get("required", [])) == sorted(tool.inputs.get("required", [])), name
        assert rendered["additionalProperties"] is False
        for key, prop in declared.items():
            got = rendered["properties"][key]
            if prop.get("format") == "image":  # handles (img_0) mean nothing to a LangChain model
                assert got["description"].endswith(": a file path or a data URL (data:image/png;base64,...)")
                assert "img_" not in got["description"], (name, key)
            else:
                assert got.get("description") == prop.get("description"), (name, key)
            typed = got if key in tool.inputs.get("required", []) else got["anyOf"][0]
            for bound in KEPT_KEYWORDS:
                if bound in prop:
                    assert typed[bound] == prop[bound], (name, key, bound)


def test_tool_errors_come_back_as_error_tool_messages(scene, tiny_models):
    measure = to_langchain(Measure())
    unlucky = _call(measure, {"image": scene(), "size": 13}, call_id="7")
    assert isinstance(unlucky, ToolMessage)
    assert unlucky.status == "error" and unlucky.tool_call_id == "7"
    assert unlucky.content == "measure: size 13 is unlucky; pick another"
    assert _call(measure, {"image": scene(), "size": 12}).status == "success"
    missing = _call(measure, {"image": "/nonexistent/photo.png", "size": 12})  # our tool's own check
    assert missing.status == "error" and "/nonexistent/photo.png" in missing.content
    grounding = to_langchain(GroundingTool(backend="owlvit", model=str(tiny_models("owlvit")), threshold=0.0))
    empty = _call(grounding, {"image": scene(), "phrase": ""})
    assert empty.status == "error" and "empty" in empty.content
    no_call_id = grounding.invoke({"image": scene(), "phrase": ";"})  # the error text, no message
    assert no_call_id.startswith("grounding: the phrase")


def test_image_outputs_arrive_as_image_content_blocks(scene, tiny_models):
    draw = to_langchain(DrawBoxesTool())
    assert draw.name == "draw_boxes" and draw.response_format == "content_and_artifact"
    message = _call(draw, {"image": scene(), "boxes": [[1, 1, 20, 20]]})
    assert isinstance(message, ToolMessage) and message.status == "success"
    text, image_block = message.content
    assert text == {"type": "text", "text": message.artifact.content}
    assert text["text"].startswith("drew 1 box")
    assert image_block["type"] == "image" and image_block["mime_type"] == "image/png"
    made = message.artifact.images[0]
    assert list(_decode(image_block).convert("RGB").getdata()) == list(made.convert("RGB").getdata())
    assert list(made.getdata()) != list(scene().getdata())  # the box was drawn
    assert message.content_blocks[1]["type"] == "image"  # langchain-core reads it as a standard block
    (openai,) = convert_to_openai_messages([message])  # what an OpenAI-format vision model is sent
    assert openai["role"] == "tool"
    assert openai["content"][1]["image_url"]["url"] == "data:image/png;base64," + image_block["base64"]
    grounding = to_langchain(GroundingTool(backend="owlvit", model=str(tiny_models("owlvit")), threshold=0.0))
    found = _call(grounding, {"image": scene(), "phrase": "person", "max_boxes": 2})
    assert found.content[0]["text"].startswith("found")
    assert [b["type"] for b in found.content] == ["text"] + ["image"] * len(found.artifact.images)
    assert found.artifact.artifact["count"] == len(found.artifact.artifact["boxes"]) <= 2


def test_round_trip_and_image_blocks_back_into_our_tools(scene):
    back = from_langchain(to_langchain(DrawBoxesTool()))
    out = back(image=scene(), boxes=[[2, 2, 30, 30]])
    assert not out.error and out.images and out.images[0].size == (160, 120)
    failed = back(image=scene(), boxes=[[2, 2, 30, 30]], labels=["a", "b"])
    assert failed.error and "give one label per box" in failed.content

    @lc_tool
    def paint(color: str) -> list[dict]:
        """Paint a small image of one colour."""
        image = Image.new("RGB", (8, 6), color)
        return [
            {"type": "text", "text": f"painted {color}"},
            {"type": "image", "base64": png_base64(image), "mime_type": "image/png"},
        ]

    painted = from_langchain(paint)(color="red")
    assert painted.content == "painted red" and not painted.error
    assert [im.size for im in painted.images] == [(8, 6)]
    assert painted.images[0].convert("RGB").getpixel((3, 3)) == (255, 0, 0)


def test_langchain_example_runs(scene_path, capsys):
    example = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "langchain_tools.py"))
    example["main"](str(scene_path))
    printed = capsys.readouterr().out
    offered = json.loads(printed[: printed.index("\ncall_1")])
    assert offered["required"] == ["image", "phrase"]
    assert offered["properties"]["image"]["description"].startswith("the image to count in: a file path")
    assert offered["properties"]["threshold"]["anyOf"][0] == {"type": "number", "minimum": 0, "maximum": 1}
    assert "call_1 counter: status=success blocks=['text', 'image']" in printed
    assert "call_3 grounding: status=error blocks=['text'] text=\"grounding: the phrase is empty" in printed
    assert "refused before the tool ran: ('threshold',)" in printed


def test_schemas_a_model_cannot_express_are_refused_naming_the_tool():
    tree = {
        "type": "object",
        "properties": {"node": {"$ref": "#/$defs/Node"}},
        "$defs": {"Node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/Node"}}}},
    }
    remote = {"type": "object", "properties": {"x": {"$ref": "https://example.com/x.json"}}}
    for inputs, problem in ((tree, "nests more than 32 levels"), (remote, "is not local")):
        odd = type("Odd", (Tool,), {"name": "odd", "description": "odd", "inputs": inputs})
        with pytest.raises(ValueError, match=f"tool 'odd': cannot turn its input schema .*{problem}"):
            to_langchain(odd())
