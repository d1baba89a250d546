"""LangChain interop: a langchain-core tool registered as ours runs; ours run as langchain-core tools."""

from __future__ import annotations

from langchain_core.messages import ToolMessage
from langchain_core.tools import ToolException
from langchain_core.tools import tool as lc_tool

from toolvlm.tools import ToolOutput, registry
from toolvlm.tools.draw import DrawBoxesTool
from toolvlm.tools.grounding import GroundingTool
from toolvlm.tools.langchain import from_langchain, to_langchain

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
    assert wrapped(text="hi").content == "HI"
    failed = wrapped(text="")
    assert failed.error and "nothing to shout" in failed.content


def test_our_tools_run_as_langchain_tools(scene, tiny_models):
    draw = to_langchain(DrawBoxesTool())
    assert draw.name == "draw_boxes" and draw.response_format == "content_and_artifact"
    message = draw.invoke(
        {
            "type": "tool_call",
            "name": "draw_boxes",
            "id": "1",
            "args": {"image": scene(), "boxes": [[1, 1, 20, 20]]},
        }
    )
    assert isinstance(message, ToolMessage)
    assert message.content.startswith("drew 1 box")
    assert isinstance(message.artifact, ToolOutput) and message.artifact.images
    grounding = to_langchain(GroundingTool(backend="owlvit", model=str(tiny_models("owlvit")), threshold=0.0))
    content = grounding.invoke({"image": scene(), "phrase": "person"})
    assert content.startswith("found")
    bad = grounding.invoke(
        {"type": "tool_call", "name": "grounding", "id": "2", "args": {"image": scene(), "phrase": ""}}
    )
    assert bad.artifact.error and "empty" in bad.content
