"""Drafted and plain greedy decoding of the real SmolLM2-135M-Instruct, token by token, in fp32 (the dtype that
drafts; bf16 decodes without them, which `test_vlm_drafting.py` checks on a tiny model)."""

from __future__ import annotations

import pytest

from toolvlm.vlm import VisionSpec, VLMSpec, build_vlm
from toolvlm.vlm.engine import SamplingConfig

pytestmark = pytest.mark.smollm2

QUESTIONS = [
    "What is the capital of France?",
    "Describe a meadow with a tree and some people in two sentences.",
    "Count from one to ten in words.",
    "What colour is the sky on a clear day, and why?",
]


class _Guesses:
    """Proposes a known continuation of a prompt, every fifth guess wrong."""

    def __init__(self, prompt_length: int, continuation: list[int]):
        self.start, self.continuation = prompt_length, continuation

    def propose(self, sequence: list[int], limit: int | None = None) -> list[int]:
        done = len(sequence) - self.start
        guess = self.continuation[done : done + min(limit or 8, 8)]
        return [t + 1 if (done + i) % 5 == 4 else t for i, t in enumerate(guess)]


def test_drafts_never_change_smollm2_greedy_tokens_in_fp32():
    vision = VisionSpec(
        image_size=32, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1
    )
    vlm = build_vlm(VLMSpec(lm="smollm2", vision=vision), dtype="float32")
    engine, accepted = vlm.engine, 0
    for question in QUESTIONS:
        ids = vlm.render([{"role": "user", "content": question}], add_generation_prompt=True).input_ids
        cfg = SamplingConfig(max_new_tokens=32, stop_token_ids=vlm.stop_token_ids)
        engine.reset()
        plain = list(engine.generate(ids, config=cfg))
        engine.reset()
        drafted = list(engine.generate(ids, config=cfg, drafter=_Guesses(len(ids), plain)))
        assert drafted == plain, f"{question!r}: drafts changed the greedy tokens"
        accepted += engine.stats.accepted_tokens
    assert accepted > 0
