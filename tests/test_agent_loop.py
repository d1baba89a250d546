"""The agent loop driven by a scripted controller: chains, mistakes, bugs, limits, handles, tool-made images."""

from __future__ import annotations

import json

import pytest
from conftest import make_image

from toolvlm.agent.assistant import Assistant
from toolvlm.agent.controllers import ScriptedController
from toolvlm.agent.events import AnswerEvent, TokenEvent, ToolCallEvent, ToolResultEvent
from toolvlm.agent.trajectory import AssistantStep, EndStep, ToolStep, UserStep


def call(name: str, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def test_chain_of_several_tools_in_one_turn(agent_tools, agent_image):
    controller = ScriptedController(
        [
            "Let me look. "
            + call("grounding", image="img_0", phrase="tree")
            + call("counter", image="img_0", phrase="person"),
            call("counter", image="img_1", phrase="tree"),
            "There is one tree; about 8 people.",
        ]
    )
    bot = Assistant(controller, agent_tools)
    reply = bot.chat("Box the tree and count the people", images=[agent_image])
    assert reply.text == "There is one tree; about 8 people."
    assert reply.finish == "answer"
    kinds = [type(s).__name__ for s in reply.steps]
    assert kinds == [
        "UserStep",
        "AssistantStep",
        "ToolStep",
        "ToolStep",
        "AssistantStep",
        "ToolStep",
        "AssistantStep",
    ]
    results = [s for s in reply.steps if isinstance(s, ToolStep)]
    assert [r.name for r in results] == ["grounding", "counter", "counter"]
    assert results[0].images == ["img_1"] and results[0].artifact == {"boxes": [[2, 2, 32, 24]]}
    assert results[1].content == "about 8 person" and not results[1].error
    assert reply.handles == ["img_1"] and reply.images[0].size == agent_image.size
    # the third controller call saw the tool results of the first reply, in order
    seen = controller.calls[1].text()
    assert seen.index("found tree") < seen.index("about 8 person")
    # the counter got the image resolved from its handle: the first call img_0, the last img_1 (the drawn one)
    counter = agent_tools["counter"]
    assert counter.seen[0] is bot.image("img_0") and counter.seen[1] is bot.image("img_1")


def test_system_prompt_lists_schemas_and_protocol(agent_tools):
    controller = ScriptedController(["hello"])
    Assistant(controller, agent_tools).chat("hi")
    system = controller.calls[0].messages[0]
    assert system["role"] == "system"
    assert '"name": "counter"' in system["content"] and "<tool_call>" in system["content"]
    assert "tools" not in controller.calls[0].options


def test_native_tool_template_gets_tools(agent_tools):
    controller = ScriptedController(["hello"], supports_tool_template=True)
    Assistant(controller, agent_tools).chat("hi")
    options = controller.calls[0].options
    assert [t["function"]["name"] for t in options["tools"]] == ["counter", "grounding", "broken"]
    assert options["tools"][0]["type"] == "function"
    assert '"name": "counter"' not in controller.calls[0].messages[0]["content"]


def test_malformed_call_then_recovery(agent_tools, agent_image):
    controller = ScriptedController(
        [
            '<tool_call>{"name": "counter", "arguments": {"image": "img_0", phrase: person}}</tool_call>',
            call("counter", image="img_0", phrase="person"),
            "About 8 people.",
        ]
    )
    reply = Assistant(controller, agent_tools).chat("How many people?", images=[agent_image])
    assert reply.text == "About 8 people." and reply.finish == "answer"
    first = reply.steps[1]
    assert isinstance(first, AssistantStep) and not first.calls and len(first.errors) == 1
    observation = reply.steps[2]
    assert isinstance(observation, ToolStep) and observation.error
    assert "could not parse the tool call" in observation.content and "<tool_call>" in observation.content
    # the model read the observation before its second try
    assert "could not parse the tool call" in controller.calls[1].text()


def test_unknown_tool_invalid_arguments_and_unknown_handle(agent_tools, agent_image):
    controller = ScriptedController(
        [
            call("detect", image="img_0", phrase="tree")
            + call("counter", image="img_0")
            + call("counter", image="img_7", phrase="tree")
            + call("counter", image="img_0", phrase=""),
            "Sorry.",
        ]
    )
    reply = Assistant(controller, agent_tools).chat("?", images=[agent_image])
    errors = [s.content for s in reply.steps if isinstance(s, ToolStep)]
    assert errors[0] == "unknown tool 'detect'; tools are: counter, grounding, broken"
    assert "missing required argument(s) ['phrase']" in errors[1] and "phrase (string, required)" in errors[1]
    assert "unknown image 'img_7'" in errors[2] and "img_0 (from user)" in errors[2]
    assert "phrase is empty" in errors[3]  # the tool's own ToolInputError
    assert all(s.error for s in reply.steps if isinstance(s, ToolStep))
    assert reply.text == "Sorry."


def test_repeated_mistakes_end_the_turn(agent_tools):
    controller = ScriptedController([call("nope")] * 3)
    reply = Assistant(controller, agent_tools, config={"max_retries": 2}).chat("?")
    assert reply.finish == "retries" and "gave up after 3 replies" in reply.text
    assert isinstance(reply.steps[-1], EndStep)
    assert len(controller.calls) == 3


def test_tool_raising_propagates_with_steps_kept(agent_tools):
    controller = ScriptedController([call("broken", x=1)])
    bot = Assistant(controller, agent_tools)
    with pytest.raises(RuntimeError, match="bug in broken tool"):
        bot.chat("break it")
    steps = bot.trajectory.steps
    assert isinstance(steps[0], UserStep) and isinstance(steps[1], AssistantStep)
    assert [c.name for c in bot.trajectory.pending_calls()] == ["broken"]


def test_controller_failure_propagates(agent_tools):
    controller = ScriptedController([ConnectionError("server down")])
    with pytest.raises(ConnectionError):
        Assistant(controller, agent_tools).chat("hi")


def test_step_limit(agent_tools, agent_image):
    controller = ScriptedController([call("counter", image="img_0", phrase="person")] * 3)
    reply = Assistant(controller, agent_tools, config={"max_steps": 3}).chat(
        "count forever", images=[agent_image]
    )
    assert reply.finish == "step_limit" and "stopped after 3 replies" in reply.text
    assert len(controller.calls) == 3
    assert isinstance(reply.steps[-1], EndStep)


def test_handles_across_turns(agent_tools):
    first, second = make_image(64, 48), make_image(32, 32, (0, 0, 200))
    controller = ScriptedController(
        [
            call("grounding", image="img_0", phrase="tree"),
            "Done: img_1.",
            call("counter", image="img_1", phrase="tree") + call("counter", image="img_2", phrase="dog"),
            "ok",
        ]
    )
    bot = Assistant(controller, agent_tools)
    bot.chat("box the tree", images=[first])
    reply = bot.chat("count trees in img_1 and dogs in the new one", images=[second])
    assert bot.handles == ["img_0", "img_1", "img_2"]
    user = bot.trajectory.steps[-5]
    assert isinstance(user, UserStep) and user.images == ["img_2"]
    counter = agent_tools["counter"]
    assert counter.seen[0] is bot.image("img_1") and counter.seen[1] is second
    results = [s for s in reply.steps if isinstance(s, ToolStep)]
    assert [r.content for r in results] == ["about 8 tree", "about 4 dog"]


def test_tool_made_image_in_next_controller_input(agent_tools, agent_image):
    controller = ScriptedController([call("grounding", image="img_0", phrase="tree"), "There it is."])
    bot = Assistant(controller, agent_tools)
    bot.chat("box the tree", images=[agent_image])
    before, after = controller.calls
    assert len(before.images) == 1 and len(after.images) == 2
    assert after.images[1] is bot.image("img_1") and after.images[1] is not agent_image
    tool_message = after.messages[-1]
    assert tool_message["role"] == "tool" and tool_message["name"] == "grounding"
    parts = tool_message["content"]
    assert parts[0]["text"].endswith("New images: img_1")
    assert {"type": "image"} in parts and {"type": "text", "text": "img_1:"} in parts
    # image parts appear in the same order as the images list
    n_parts = sum(
        1
        for m in after.messages
        if isinstance(m["content"], list)
        for p in m["content"]
        if p["type"] == "image"
    )
    assert n_parts == len(after.images)


def test_stream_events_hide_call_markup(agent_tools, agent_image):
    controller = ScriptedController(
        ["Counting. " + call("counter", image="img_0", phrase="person"), "About 8."], chunk_size=3
    )
    events = list(Assistant(controller, agent_tools).stream("count", images=[agent_image]))
    kinds = [e.kind for e in events]
    assert kinds[-1] == "answer" and "tool_call" in kinds and "tool_result" in kinds
    text = "".join(e.text for e in events if isinstance(e, TokenEvent))
    assert text == "Counting. About 8."
    call_event = next(e for e in events if isinstance(e, ToolCallEvent))
    assert call_event.call.short() == 'counter(image="img_0", phrase="person")'
    result = next(e for e in events if isinstance(e, ToolResultEvent))
    assert result.step.content == "about 8 person"
    assert isinstance(events[-1], AnswerEvent) and events[-1].text == "About 8."


def test_keyboard_interrupt_cancels_generation_keeps_conversation(agent_tools):
    def interrupted():
        yield "partial "
        raise KeyboardInterrupt

    controller = ScriptedController(["first answer"])
    bot = Assistant(controller, agent_tools)
    bot.chat("one")
    controller.stream = lambda *a, **k: interrupted()  # the next generation is interrupted by Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        bot.chat("two")
    last = bot.trajectory.steps[-1]
    assert isinstance(last, AssistantStep) and last.cancelled and last.text == "partial "
    assert bot.trajectory.turn_finished()


def test_tool_images_off_names_images_without_showing_them(agent_tools, agent_image):
    controller = ScriptedController([call("grounding", image="img_0", phrase="tree"), "There it is."])
    bot = Assistant(controller, agent_tools, config={"tool_images": False})
    bot.chat("box the tree", images=[agent_image])
    after = controller.calls[1]
    assert len(after.images) == 1 and after.images[0] is agent_image
    tool_message = after.messages[-1]
    assert tool_message["content"] == [{"type": "text", "text": tool_message["content"][0]["text"]}]
    assert tool_message["content"][0]["text"].endswith("New images: img_1")
    assert bot.image("img_1") is not None  # still made and kept, only not shown


def test_compact_prompt_lists_tools_with_their_arguments(agent_tools):
    controller = ScriptedController(["hello"])
    Assistant(controller, agent_tools, config={"prompts": "compact"}).chat("hi")
    system = controller.calls[0].messages[0]["content"]
    assert "- grounding(image, phrase" in system and "<tool_call>" in system
    assert '"parameters"' not in system and len(system) < 800


def test_no_repeat_reply_ngram_bans_loops_in_the_reply_only():
    import torch

    from toolvlm.agent.repetition import NoRepeatReplyNGram

    ban = NoRepeatReplyNGram(3)
    prompt = [7, 8, 9, 7, 8]  # the prompt repeats (7, 8) -> 9; copying it is allowed
    scores = torch.zeros(1, 12)
    assert torch.isfinite(ban(torch.tensor([prompt]), scores)).all()
    reply = [1, 2, 3, 1, 2]  # (1, 2) -> 3 already in the reply: 3 is banned next
    out = ban(torch.tensor([prompt + reply]), scores)
    assert out[0, 3] == float("-inf") and torch.isfinite(out[0, [0, 1, 2, 4, 9]]).all()
    only = torch.full((1, 12), float("-inf"))
    only[0, 3] = 0.0  # a grammar left only token 3: it stays
    assert ban(torch.tensor([prompt + reply]), only)[0, 3] == 0.0


def test_agent_passes_the_repetition_processor(agent_tools):
    controller = ScriptedController(["hello"])
    Assistant(controller, agent_tools, config={"no_repeat_ngram": 8}).chat("hi")
    processors = controller.calls[0].options["logits_processor"]
    assert [type(p).__name__ for p in processors] == ["NoRepeatReplyNGram"]


def test_an_empty_answer_is_a_mistake_retried_then_the_turn_ends(agent_tools):
    # an empty reply, and one the stop string cuts to nothing (the model imagining a tool's result)
    controller = ScriptedController(["", '<tool_response>{"count": 3}</tool_response>', "About 3 people."])
    reply = Assistant(controller, agent_tools).chat("How many people?")
    assert reply.text == "About 3 people." and reply.finish == "answer"
    observations = [s for s in reply.steps if isinstance(s, ToolStep)]
    assert len(observations) == 2 and all(
        s.error and "the reply was empty" in s.content for s in observations
    )
    assert "the reply was empty" in controller.calls[1].text()  # the model read it before its retry

    controller = ScriptedController(["  \n", "<tool_response>", ""])
    reply = Assistant(controller, agent_tools, config={"max_retries": 2}).chat("?")
    assert reply.finish == "retries" and "gave up after 3 replies" in reply.text
    assert "the reply was empty" in reply.text and isinstance(reply.steps[-1], EndStep)
    assert len(controller.calls) == 3
