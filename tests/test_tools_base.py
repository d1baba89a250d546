"""The tool contract: definition-time checks, the @tool decorator, validation, the registry and entry points."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from typing import Literal

import pytest
from PIL import Image

from toolvlm.tools import Tool, ToolInputError, ToolOutput, build_tools, registry, tool

pytest_plugins = ["fixtures_tools"]  # fixtures: scene, tiny_models, scene_path


def test_tool_with_mismatched_forward_is_refused_at_definition():
    with pytest.raises(TypeError, match=r"\['phrase', 'image'\]|\['image', 'phrase'\].*\['image', 'text'\]"):

        class Broken(Tool):
            name = "broken"
            description = "d"
            inputs = {
                "type": "object",
                "properties": {"image": {"type": "string"}, "text": {"type": "string"}},
            }

            def forward(self, image, phrase):
                return ToolOutput("x")


def test_required_parameter_must_be_declared_required():
    with pytest.raises(TypeError, match="required"):

        class Loose(Tool):
            name = "loose"
            description = "d"
            inputs = {"type": "object", "properties": {"x": {"type": "integer"}}}

            def forward(self, x):
                return ToolOutput(str(x))


class Echo(Tool):
    name = "echo"
    description = "Echo a number."
    inputs = {
        "type": "object",
        "properties": {
            "image": {"type": "string", "format": "image", "description": "an image"},
            "n": {"type": "integer", "minimum": 0},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["n"],
    }

    def __init__(self) -> None:
        super().__init__()
        self.setups = 0

    def setup(self) -> None:
        self.setups += 1

    def forward(self, n: int, image: Image.Image | None = None, tags: list[str] | None = None) -> ToolOutput:
        if n == 13:
            raise ToolInputError("13 is unlucky; pick another number")
        if n == 99:
            raise RuntimeError("a bug")
        size = list(image.size) if image is not None else None
        return ToolOutput(
            content=f"n={n}", artifact={"n": n, "size": size, "mode": image.mode if image else None}
        )


def test_call_validates_coerces_and_sets_up_once(scene, tmp_path):
    echo = Echo()
    assert echo(n=3).artifact["n"] == 3
    assert echo(n="4").artifact["n"] == 4  # a string from a command line or a model
    assert echo(n=5, tags='["a"]').content == "n=5"
    assert echo.setups == 1
    path = tmp_path / "rgba.png"
    scene(20, 10).convert("RGBA").save(path)
    out = echo(n=1, image=str(path))
    assert out.artifact["size"] == [20, 10] and out.artifact["mode"] == "RGB"
    palette = echo(n=1, image=scene(8, 8).convert("P"))
    assert palette.artifact["mode"] == "RGB"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "missing required"),
        ({"n": -1}, "minimum"),
        ({"n": "many"}, "argument 'n'"),
        ({"n": 1, "m": 2}, "unknown argument"),
        ({"n": 1, "image": 5}, "image"),
        ({"n": 13}, "unlucky"),
    ],
)
def test_bad_input_becomes_an_error_output(kwargs, expected):
    out = Echo()(**kwargs)
    assert out.error and expected in out.content and out.content.startswith("echo: ")


def test_bugs_still_raise():
    with pytest.raises(RuntimeError, match="a bug"):
        Echo()(n=99)


def test_schema_shape():
    assert Echo().schema() == {"name": "echo", "description": "Echo a number.", "parameters": Echo.inputs}


def test_tool_decorator_builds_schema_from_hints_and_docstring(scene):
    @tool
    def scale(
        image: Image.Image, factor: float, mode: Literal["up", "down"] = "up", tags: list[str] | None = None
    ) -> dict:
        """Scale an image.

        Args:
            image: the picture
            factor: how much, e.g. 2.0
                (continued)
            mode: up or down
        """
        return {"size": [image.width * factor, image.height], "mode": mode}

    assert isinstance(scale, Tool) and scale.name == "scale"
    assert scale.description == "Scale an image."
    params = scale.schema()["parameters"]
    assert params["required"] == ["image", "factor"]
    assert params["properties"]["image"] == {
        "type": "string",
        "format": "image",
        "description": "the picture",
    }
    assert params["properties"]["factor"]["type"] == "number"
    assert params["properties"]["factor"]["description"] == "how much, e.g. 2.0 (continued)"
    assert params["properties"]["mode"]["enum"] == ["up", "down"]
    assert params["properties"]["tags"] == {"type": "array", "items": {"type": "string"}}
    out = scale(image=scene(10, 10), factor=2)
    assert out.artifact == {"size": [20.0, 10], "mode": "up"}
    assert scale(image=scene(), factor="x").error


def test_tool_decorator_needs_a_docstring():
    with pytest.raises(TypeError, match="docstring"):

        @tool
        def nodoc(x: int) -> int:
            return x


def test_registry_lists_builtins_and_registers():
    assert registry.names()[:5] == ["grounding", "captioner", "counter", "generator", "draw_boxes"]
    schemas = {s["name"]: s for s in registry.list_tools()}
    assert schemas["counter"]["parameters"]["required"] == ["image", "phrase"]
    name = registry.register(Echo)
    try:
        assert registry.get("echo")(n=2).content == "n=2"
        with pytest.raises(ValueError, match="registered already"):
            registry.register(Echo)
        assert build_tools({"echo": {}})["echo"].name == "echo"
    finally:
        registry.unregister(name)
    with pytest.raises(KeyError, match="unknown tool 'nope'.*grounding"):
        registry.get("nope")


def test_build_tools_rejects_unknown_tools_and_backends():
    with pytest.raises(KeyError, match="detector"):
        build_tools({"detector": {}})
    with pytest.raises(ValueError, match="known backends: grounding_dino, inhouse, owlv2, owlvit"):
        build_tools({"grounding": {"backend": "yolo"}})
    with pytest.raises(ValueError, match="known backends: gligen, inhouse, sd"):
        build_tools({"generator": {"backend": "dalle"}})
    with pytest.raises(ValueError, match="blip, blip2, inhouse"):
        build_tools({"captioner": {"backend": "git"}})


def test_backends_are_listed_without_loading_models():
    assert registry.backends("grounding") == ["owlv2", "owlvit", "grounding_dino", "inhouse"]
    assert registry.backends("counter") == registry.backends("grounding")
    assert registry.backends("captioner") == ["blip", "blip2", "inhouse", "grounded"]
    assert registry.backends("generator") == ["sd", "gligen", "inhouse"]
    assert registry.backends("draw_boxes") is None


def test_entry_point_tools_are_registered(monkeypatch):
    ep = importlib.metadata.EntryPoint(
        name="echo_ep", value="test_tools_base:Echo", group=registry.ENTRY_POINT_GROUP
    )
    real = importlib.metadata.entry_points

    def fake(**kwargs):
        return [ep] if kwargs.get("group") == registry.ENTRY_POINT_GROUP else real(**kwargs)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "_entries", dict(registry.BUILTINS))
    assert "echo_ep" in registry.names()
    assert registry.get("echo_ep")(n=7).artifact["n"] == 7


def test_listing_tools_loads_no_model_code():
    code = (
        "import sys, json; from toolvlm.tools import list_tools, registry; json.dumps(list_tools());"
        "[registry.backends(n) for n in registry.names()];"
        "print(json.dumps([m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_tools_package_does_not_import_agent_or_vlm():
    code = (
        "import sys, toolvlm.tools.cli, toolvlm.tools.generator, toolvlm.tools.captioner, toolvlm.tools.langchain;"
        "print([m for m in sys.modules if m.startswith(('toolvlm.agent', 'toolvlm.vlm'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
