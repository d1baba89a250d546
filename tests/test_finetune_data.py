"""The training data format: JSONL round trip, LLaVA lines, saved agent sessions as examples, labels."""

from __future__ import annotations

import json

import pytest
from conftest import FakeCounter, make_image
from fixtures_vlm import chat, n_images, random_image, tiny_lm_dir, tiny_spec  # noqa: F401

from toolvlm.agent.controllers import ScriptedController
from toolvlm.agent.loop import Agent
from toolvlm.agent.session import SessionStore
from toolvlm.finetune.data import (
    ConversationDataset,
    Example,
    example_from_session,
    load_examples,
    read_jsonl,
    system_prompt,
    write_jsonl,
)
from toolvlm.vlm import build_vlm
from toolvlm.vlm.chat import IGNORE_INDEX


@pytest.fixture(scope="module")
def vlm(tiny_lm_dir):  # noqa: F811
    return build_vlm(tiny_spec(tiny_lm_dir, pooling=2), dtype="float32")


def test_jsonl_round_trip_keeps_messages_and_pixels(tmp_path):
    messages = chat(2)
    images = [random_image(i) for i in range(n_images(messages))]
    path = write_jsonl(tmp_path / "d.jsonl", [Example(messages, images, id="ex1", meta={"task": "t"})])
    record = json.loads(path.read_text())
    assert all(not p.startswith("/") for p in record["images"])  # relative to the JSONL
    (back,) = read_jsonl(path)
    assert back.messages == messages and back.id == "ex1" and back.meta == {"task": "t"}
    assert [im.tobytes() for im in back.load_images()] == [im.tobytes() for im in images]


def test_mismatched_images_fail_naming_both_counts():
    with pytest.raises(ValueError, match="2 image parts in the messages, 1 images"):
        Example(chat(2), [random_image(0)])


def test_llava_lines_are_read(tmp_path):
    random_image(0).save(tmp_path / "a.png")
    line = {"id": "l1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A dog."}]}  # fmt: skip
    (tmp_path / "l.jsonl").write_text(json.dumps(line) + "\n")
    (ex,) = read_jsonl(tmp_path / "l.jsonl")
    assert ex.messages[0] == {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}],
    }
    assert ex.messages[1]["role"] == "assistant" and len(ex.images) == 1


def test_bad_line_names_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_jsonl(tmp_path / "bad.jsonl")


def _saved_session(folder):
    controller = ScriptedController(
        [
            '<tool_call>{"name": "counter", "arguments": {"image": "img_0", "phrase": "person"}}</tool_call>',
            "There are 8 people.",
        ]  # fmt: skip
    )
    agent = Agent(controller, [FakeCounter()], session=SessionStore(folder))
    list(agent.run("How many people?", [make_image(64, 48)]))
    return agent


def test_saved_agent_session_is_a_training_example_as_it_is(tmp_path, vlm):
    agent = _saved_session(tmp_path / "session")
    example = example_from_session(tmp_path / "session", system=agent.system_prompt())
    assert example.messages == agent.trajectory.to_messages(agent.system_prompt())
    assert len(example.images) == 1
    # a folder of sessions and a JSONL pointer load the same example
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "p.jsonl").write_text(json.dumps({"session": "../session"}) + "\n")
    (from_folder,) = load_examples(tmp_path)
    (from_pointer,) = read_jsonl(tmp_path / "lists" / "p.jsonl")
    assert from_folder.messages[1:] == from_pointer.messages[1:] == example.messages[1:]
    assert from_folder.messages[0]["content"] == system_prompt()
    rendered = vlm.render(example.messages, example.load_images())
    assert any(t != IGNORE_INDEX for t in rendered.labels)


def test_labels_only_on_assistant_tokens(tmp_path, vlm):
    messages = chat(3)
    messages[2] = {**messages[2], "supervise": False}  # context, not a target
    images = [random_image(i) for i in range(n_images(messages))]
    dataset = ConversationDataset([Example(messages, images)], vlm)
    item = dataset[0]
    supervised = [t for t in item.labels if t != IGNORE_INDEX]
    expected = "".join(
        m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant" and m.get("supervise", True)
    )
    assert vlm.tokenizer.decode(supervised) == expected
    for start, end in item.image_spans:
        assert set(item.labels[start:end]) == {IGNORE_INDEX}
    assert len(item.image_keys) == len(images)


def test_dataset_leaves_out_too_long_examples(vlm):
    short = Example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    long = Example([{"role": "user", "content": "hi " * 200}, {"role": "assistant", "content": "hello"}])
    dataset = ConversationDataset([short, long], vlm, max_length=64)
    assert len(dataset) == 1 and dataset.lengths[0] <= 64
