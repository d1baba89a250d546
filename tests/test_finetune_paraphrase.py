"""The paraphrase grammar of training requests, and how world conversations use it."""

from __future__ import annotations

import random

import pytest

from toolvlm.finetune.build_world import TEMPLATES, WorldDataConfig, world_example
from toolvlm.finetune.paraphrase import KINDS, request

FILL = {"x": "the red car", "c": "twice as many people"}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_gives_many_distinct_filled_sentences(kind):
    rng = random.Random(0)
    texts = [request(kind, rng, **FILL) for _ in range(400)]
    assert len(set(texts)) > 60  # the old template lists held 5-12 per kind
    for text in texts:
        assert "{" not in text and text[0].isupper() and text.endswith((".", "?")), text
        assert "  " not in text and "..?" not in text, text
    if kind not in ("describe", "caption"):
        assert all(("red car" in t) or ("twice as many people" in t) for t in texts)


def test_never_a_held_out_text():
    rng = random.Random(1)
    for kind in ("ground", "count", "describe"):
        heldout = {t.format(**FILL) for t in TEMPLATES[kind]["heldout"]}
        assert not heldout & {request(kind, rng, avoid=heldout, **FILL) for _ in range(500)}
    with pytest.raises(ValueError, match="kinds are"):
        request("dance", rng)


def test_world_conversations_route_descriptions_and_presence_through_tools():
    config = WorldDataConfig(
        n_scenes=12, seed=3, task_weights={"describe": 1.0, "vqa": 1.0}, max_turns=2, grammar_share=0.7,
        composed_share=0.5,
    )  # fmt: skip
    called, families = set(), set()
    for i in range(12):
        example = world_example(i, config)
        for turn in example.meta["turns"]:
            if turn["task"] == "describe" or turn["truth"].get("answer") in ("yes", "no"):
                (expected,) = turn["expected_calls"]
                called.add(expected["name"])
        tool_texts = [m for m in example.messages if m["role"] == "tool"]
        assert tool_texts  # every conversation called a tool
        families.add(example.meta["seed"])
    assert called == {"captioner", "grounding"}
