"""The tool-call protocol, streamed-text filtering, image handles and prompt templates."""

from __future__ import annotations

import pytest
from conftest import FakeCounter, make_image

from toolvlm.agent.loop import AgentConfig
from toolvlm.agent.memory import ImageMemory, UnknownImageError
from toolvlm.agent.prompting import load_prompts, openai_tools, system_prompt
from toolvlm.agent.protocol import CallTextFilter, ToolCall, parse_reply


def test_parse_several_calls_and_text():
    reply = (
        'First. <tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call> then '
        '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call> done.'
    )
    parsed = parse_reply(reply)
    assert parsed.calls == [ToolCall("a", {"x": 1}), ToolCall("b", {})]
    assert parsed.errors == [] and parsed.text == "First.  then  done."


def test_closing_tag_inside_a_string_is_not_the_end():
    reply = '<tool_call>{"name": "say", "arguments": {"text": "</tool_call> is the tag"}}</tool_call>ok'
    parsed = parse_reply(reply)
    assert parsed.calls == [ToolCall("say", {"text": "</tool_call> is the tag"})] and parsed.text == "ok"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"name": "a", "arguments": {"x": }}', "could not parse the tool call"),
        ('["a"]', "must be a JSON object, got list"),
        ('{"arguments": {}}', 'has no "name" string'),
        ('{"name": "a", "arguments": [1]}', "\"arguments\" of tool 'a' must be a JSON object"),
    ],
)
def test_malformed_calls_become_messages(body, message):
    parsed = parse_reply(f"<tool_call>{body}</tool_call>")
    assert not parsed.calls and len(parsed.errors) == 1 and message in parsed.errors[0]
    assert '<tool_call>{"name": "TOOL"' in parsed.errors[0] or "JSON object" in parsed.errors[0]


def test_unclosed_call_and_lenient_forms():
    parsed = parse_reply('Sure <tool_call>{"name": "a", "arguments": {}}')
    assert not parsed.calls and "opened but not closed" in parsed.errors[0] and parsed.text == "Sure"
    parsed = parse_reply('<tool_call>{"name": "a", "arguments": "{\\"x\\": 2}"}</tool_call>')
    assert parsed.calls == [ToolCall("a", {"x": 2})]
    parsed = parse_reply('<tool_call>{"name": "a", "parameters": {"x": 3}}</tool_call>')
    assert parsed.calls == [ToolCall("a", {"x": 3})]


def test_call_render_round_trip():
    call = ToolCall("counter", {"image": "img_0", "phrase": "person"})
    assert parse_reply(call.render()).calls == [call]
    assert call.short() == 'counter(image="img_0", phrase="person")'


def test_filter_hides_calls_across_chunk_boundaries():
    text = 'Look <tool_call>{"name": "a", "arguments": {}}</tool_call>here <tool_'
    for size in (1, 3, 7, 100):
        f = CallTextFilter()
        shown = "".join(f.push(text[i : i + size]) for i in range(0, len(text), size)) + f.flush()
        assert shown == "Look here <tool_", size
    f = CallTextFilter()
    assert f.push("a <tool_call>{") == "a " and f.flush() == ""


def test_image_memory_handles():
    memory = ImageMemory()
    assert memory.add(make_image(), "user") == "img_0"
    assert memory.add(make_image(8, 8), "grounding") == "img_1"
    assert "img_1" in memory and "img_2" not in memory and "img_01x" not in memory
    assert memory.get("img_1").size == (8, 8)
    with pytest.raises(UnknownImageError, match=r"unknown image 'img_5'; images are: img_0 \(from user\)"):
        memory.get("img_5")
    with pytest.raises(TypeError):
        memory.add("not an image")


def test_prompts_are_package_data_and_fill_schemas():
    templates = load_prompts("agent")
    assert "$tools" in templates["system"]
    schema = FakeCounter().schema()
    text = system_prompt([schema])
    assert '"name": "counter"' in text and "<tool_call>" in text and "img_0" in text and "$" not in text
    native = system_prompt([schema], native=True)
    assert '"name": "counter"' not in native and "<tool_call>" in native
    assert "<tool_call>" not in system_prompt([])
    assert openai_tools([schema]) == [{"type": "function", "function": schema}]
    with pytest.raises(FileNotFoundError):
        load_prompts("no_such_prompts")


def test_agent_config_rejects_unknown_options():
    assert AgentConfig.from_dict({"max_steps": 3}).max_steps == 3
    with pytest.raises(ValueError, match="unknown agent option"):
        AgentConfig.from_dict({"max_step": 3})
