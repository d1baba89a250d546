"""Constrained decoding of tool calls with llguidance: schemas, grammar, logits processor, and the local VLM."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from conftest import FakeCounter, FakeGrounding, make_image
from fixtures_vlm import make_tokenizer, save_tiny_lm, tiny_spec
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

from toolvlm.agent.assistant import Assistant
from toolvlm.agent.constrained import ToolCallGrammar, call_schema, lark_grammar
from toolvlm.agent.controllers import LocalVLMController, ScriptedController
from toolvlm.agent.protocol import parse_reply
from toolvlm.agent.trajectory import AssistantStep, ToolStep

SCHEMAS = [FakeCounter().schema(), FakeGrounding().schema()]


def test_call_schema_narrows_handles_and_bounds_strings():
    schema = call_schema(SCHEMAS, ["img_0", "img_1"], max_string=50)
    counter = schema["anyOf"][0]
    assert counter["properties"]["name"] == {"const": "counter"}
    arguments = counter["properties"]["arguments"]
    assert arguments["properties"]["image"] == {"enum": ["img_0", "img_1"]}
    assert arguments["properties"]["phrase"]["maxLength"] == 50
    assert arguments["additionalProperties"] is False and arguments["required"] == ["image", "phrase"]
    good = {"name": "counter", "arguments": {"image": "img_1", "phrase": "person"}}
    jsonschema.validate(good, {k: v for k, v in schema.items() if k != "x-guidance"})
    with pytest.raises(ValueError, match="mode"):
        lark_grammar(SCHEMAS, [], mode="sometimes")


@pytest.fixture(scope="module")
def grammar():
    tokenizer = make_tokenizer()
    return tokenizer, ToolCallGrammar(tokenizer, [tokenizer.eos_token_id])


def accepts(grammar, text: str, mode: str = "auto") -> bool:
    """Whether the grammar accepts every token of `text` (a whole reply)."""

    tokenizer, compiled = grammar
    matcher = compiled.matcher(lark_grammar(SCHEMAS, ["img_0"], mode))
    ids = tokenizer.encode(text, add_special_tokens=False)
    return matcher.validate_tokens(ids) == len(ids)


def test_grammar_allows_text_and_several_valid_calls(grammar):
    call = '<tool_call>{"name": "counter", "arguments": {"image": "img_0", "phrase": "person"}}</tool_call>'
    box = '<tool_call>{"name": "grounding", "arguments": {"image": "img_0", "phrase": "tree"}}</tool_call>'
    assert accepts(grammar, "Let me count. " + call + box + " done")
    assert accepts(grammar, "No tools needed: a tree.")
    assert accepts(grammar, call, mode="required")
    assert not accepts(grammar, "text first " + call, mode="required")
    assert not accepts(grammar, '<tool_call>{"name": "detect", "arguments": {}}</tool_call>')
    assert not accepts(
        grammar, '<tool_call>{"name": "counter", "arguments": {"image": "img_7", "phrase": "x"}}</tool_call>'
    )
    assert not accepts(grammar, '<tool_call>{"name": "counter", "arguments": {"image": "img_0"}}</tool_call>')


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    folder = save_tiny_lm(tmp_path_factory.mktemp("lm"))
    return AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()


def test_processor_makes_a_random_model_write_valid_calls(tiny_lm):
    tokenizer, model = tiny_lm
    compiled = ToolCallGrammar(tokenizer, [tokenizer.eos_token_id])
    prompt = tokenizer(
        "<|im_start|>user\nHow many people?<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt"
    )
    for seed in range(3):
        torch.manual_seed(seed)
        processor = compiled.logits_processor(SCHEMAS, ["img_0", "img_1"], mode="required", max_string=24)
        out = model.generate(
            prompt.input_ids, max_new_tokens=80, do_sample=True, logits_processor=LogitsProcessorList([processor]),
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        text = tokenizer.decode(out[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)
        parsed = parse_reply(text)
        assert not parsed.errors and len(parsed.calls) == 1, text
        call = parsed.calls[0]
        schema = next(s for s in SCHEMAS if s["name"] == call.name)
        jsonschema.validate(call.arguments, schema["parameters"])
        assert call.arguments["image"] in ("img_0", "img_1")
    # unconstrained, the same model writes no call at all
    out = model.generate(
        prompt.input_ids, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert not parse_reply(tokenizer.decode(out[0, prompt.input_ids.shape[1] :])).calls


def test_local_vlm_controller_with_constrained_first_call(tmp_path):
    from toolvlm.vlm import build_vlm

    vlm = build_vlm(tiny_spec(save_tiny_lm(tmp_path / "lm")))
    controller = LocalVLMController(vlm)
    counter = FakeCounter()
    config = {"constrained": True, "tool_choice": "required", "max_new_tokens": 300, "max_steps": 2}
    bot = Assistant(controller, [counter, FakeGrounding()], config=config)
    reply = bot.chat("How many people?", images=[make_image()])
    first = reply.steps[1]
    assert isinstance(first, AssistantStep) and len(first.calls) == 1 and not first.errors
    result = reply.steps[2]
    assert isinstance(result, ToolStep) and not result.error, result.content
    assert result.arguments["image"] == "img_0"
    assert reply.finish in ("answer", "step_limit", "retries")


def test_constrained_needs_a_tokenizer():
    with pytest.raises(ValueError, match="needs a controller with a tokenizer"):
        Assistant(ScriptedController([]), [FakeCounter()], config={"constrained": True})
    with pytest.raises(ValueError, match="tool_choice"):
        Assistant(ScriptedController([]), [FakeCounter()], config={"tool_choice": "always"})


def test_agent_passes_processor_to_controller():
    tokenizer = make_tokenizer()
    call = '<tool_call>{"name": "counter", "arguments": {"image": "img_0", "phrase": "x"}}</tool_call>'
    controller = ScriptedController([call, "ok"], tokenizer=tokenizer)
    Assistant(controller, [FakeCounter()], config={"constrained": True}).chat("count", images=[make_image()])
    processors = [c.options["logits_processor"] for c in controller.calls]
    assert all(len(p) == 1 for p in processors)
    assert json.dumps(["img_0"]) in processors[0][0].grammar or "img_0" in processors[0][0].grammar


def test_processor_forces_the_fixed_parts_of_a_call_and_leaves_free_text_to_the_model(grammar):
    tokenizer, compiled = grammar
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    processor = compiled.logits_processor(SCHEMAS, ["img_0"], mode="auto")
    prompt = encode("How many people?")
    assert processor.forced_tokens(prompt) == []  # before the first mask: nothing is known yet
    processor(torch.tensor([prompt]), torch.zeros(1, len(tokenizer)))
    assert processor.forced_tokens([*prompt, *encode("Let me")]) == []  # free text is the model's choice
    opened = [*prompt, *encode("Let me<tool_call>")]
    forced = processor.forced_tokens(opened)
    assert tokenizer.decode(forced) == '{"name": "'
    named = [*opened, *forced, *encode("counter")]
    rest = tokenizer.decode(processor.forced_tokens(named))
    assert rest.startswith('", "arguments": {"image": "img_0", "phrase":'), rest  # the only image handle
    # the forced tokens are consumed like generated ones: the next mask allows only the string's opening,
    # ' "' (in one token or two: fast-forward stops where the next token could still merge with it)
    sequence = [*named, *encode(rest)]
    scores = processor(torch.tensor([sequence]), torch.zeros(1, len(tokenizer)))
    allowed = torch.isfinite(scores[0]).nonzero().flatten().tolist()
    assert allowed and all(' "'.startswith(tokenizer.decode([t])) for t in allowed)
