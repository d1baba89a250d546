"""The LLaMA decode step: the same logits, bit for bit, as the model's forward, and the same greedy tokens as
transformers' `generate`, in bf16 and fp32; its KV buffers; the models it declines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures_vlm import random_image, save_wide_llama, tiny_lm_dir, tiny_spec  # noqa: F401
from transformers import DynamicCache, GenerationConfig
from transformers.cache_utils import DynamicLayer

from toolvlm.vlm import build_vlm
from toolvlm.vlm.engine import SamplingConfig
from toolvlm.vlm.fast_decode import INITIAL_CAPACITY, BufferLayer, LlamaDecodeStep, buffer_cache


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory) -> Path:
    return save_wide_llama(tmp_path_factory.mktemp("gqa_lm"), seed=1)


@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def gqa_vlm(request, gqa_dir):
    return build_vlm(tiny_spec(gqa_dir), dtype=request.param)


def _prompts(n: int, length: int = 16, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 380, (length,), generator=generator).tolist() for _ in range(n)]


@torch.inference_mode()
def test_step_logits_are_the_model_forward_bit_for_bit(gqa_vlm):
    model = gqa_vlm.model
    step = LlamaDecodeStep.build(model)
    assert step is not None
    embed = model.get_input_embeddings()
    for ids in _prompts(3):
        fast, plain = buffer_cache(model.config), DynamicCache(config=model.config)
        x = embed(torch.tensor([ids]))
        model(inputs_embeds=x, cache=fast, use_cache=True, logits_to_keep=1)
        logits = model(inputs_embeds=x, cache=plain, use_cache=True, logits_to_keep=1).logits[0]
        for _ in range(40):
            x = embed(logits.argmax(-1)[None])
            expected = model(inputs_embeds=x, cache=plain, use_cache=True, logits_to_keep=1).logits[0]
            got = step(x, fast)
            assert got.dtype == expected.dtype and torch.equal(got, expected)
            logits = expected
        for a, b in zip(fast.layers, plain.layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_prepacked_step_is_as_close_to_fp32_as_the_forward(gqa_vlm, gqa_dir):
    # prepacked: oneDNN linears (residual adds fused), fp32 attention; not the forward's bits, but in bf16 no
    # further from the fp32 model's logits than the forward's own rounding, and in fp32 within summation order
    model = gqa_vlm.model
    exact, packed = LlamaDecodeStep.build(model), LlamaDecodeStep.build(model, kernels="prepacked")
    assert packed is not None and packed.kernels == "prepacked" and packed.fused[0] == 2 * len(packed.layers)
    reference = build_vlm(tiny_spec(gqa_dir), dtype="float32").model
    steps = (exact, packed, LlamaDecodeStep.build(reference))
    errors = {exact: [], packed: []}
    with torch.inference_mode():
        _decode_beside(steps, (model, model, reference), errors)
    if model.dtype == torch.float32:
        assert max(errors[packed]) < 1e-4
    else:  # (the forward's max error here is about 0.1)
        assert max(errors[packed]) <= 1.1 * max(errors[exact])
        assert sum(errors[packed]) <= 1.1 * sum(errors[exact])
    with pytest.raises(ValueError, match="kernels must be one of"):
        LlamaDecodeStep(model.model.language_model, model.lm_head, model, kernels="fast")


def _decode_beside(steps: tuple, models: tuple, errors: dict) -> None:
    """Greedy decoding led by the last step (the reference); each other step's max logit error per token."""
    for ids in _prompts(3, seed=5):
        caches = [buffer_cache(m.config) for m in models]
        for cache, m in zip(caches, models, strict=True):
            embeds = m.get_input_embeddings()(torch.tensor([ids]))
            logits = m(inputs_embeds=embeds, cache=cache, use_cache=True, logits_to_keep=1).logits[0]
        for _ in range(24):
            token = logits.argmax(-1)[None]
            got = [
                step(m.get_input_embeddings()(token), cache)
                for step, m, cache in zip(steps, models, caches, strict=True)
            ]
            assert all(value.dtype == m.dtype for value, m in zip(got, models, strict=True))
            logits = got[-1]
            for step, value in zip(steps[:-1], got, strict=False):
                errors[step].append((value.float() - logits).abs().max().item())


def _hf_greedy(vlm, ids: list[int], n: int, images=()) -> list[int]:
    """transformers' greedy `generate` of exactly `n` new tokens (no end of turn)."""
    inputs = {"input_ids": torch.tensor([ids])}
    if images:
        inputs["pixel_values"] = vlm.pixel_values(images).to(vlm.engine.dtype)
    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = vlm.model.generate(**inputs, generation_config=config)
    return out[0, len(ids) :].tolist()


def test_engine_greedy_tokens_are_transformers_generate_over_many_prompts(gqa_vlm):
    engine, fast_steps = gqa_vlm.engine, 0
    cfg = SamplingConfig(max_new_tokens=32)
    for ids in _prompts(16, seed=3):
        engine.reset()
        tokens = list(engine.generate(ids, config=cfg))
        fast_steps += engine.stats.fast_steps
        assert tokens == _hf_greedy(gqa_vlm, ids, 32), f"prompt {ids}: the engine's greedy tokens differ"
    assert fast_steps == 16 * 31  # every step after the prefill ran by the decode step


def test_engine_with_images_and_a_reused_prefix_keeps_generate_tokens(gqa_vlm):
    engine, image = gqa_vlm.engine, random_image(5)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What do you see?"}]}
    ]
    engine.reset()
    for turn in range(2):
        rendered = gqa_vlm.render(messages, [image], add_generation_prompt=True)
        cfg = SamplingConfig(max_new_tokens=20)
        tokens = list(engine.generate(rendered.input_ids, rendered.images, rendered.image_spans, cfg))
        assert tokens == _hf_greedy(gqa_vlm, rendered.input_ids, 20, rendered.images)
        assert engine.stats.fast_steps == 19 and (turn == 0 or engine.stats.reused_tokens > 0)
        reply = gqa_vlm.tokenizer.decode(tokens)
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]


def test_engine_without_the_step_gives_the_same_tokens(gqa_vlm):
    engine, cfg = gqa_vlm.engine, SamplingConfig(max_new_tokens=24)
    for ids in _prompts(4, seed=7):
        engine.reset()
        fast = list(engine.generate(ids, config=cfg))
        engine.fast_decode = False
        try:
            engine.reset()
            plain = list(engine.generate(ids, config=cfg))
            assert engine.stats.fast_steps == 0 and isinstance(engine._cache, DynamicCache)
            assert not isinstance(engine._cache.layers[0], BufferLayer)
        finally:
            engine.fast_decode = True
        assert fast == plain


def test_buffer_layer_grows_crops_and_matches_a_dynamic_layer():
    buffered, dynamic = BufferLayer(), DynamicLayer()
    generator = torch.Generator().manual_seed(0)
    for length in (5, INITIAL_CAPACITY - 3, 1, 1, 7, INITIAL_CAPACITY):  # crosses two doublings
        k, v = (torch.randn(1, 2, length, 8, generator=generator) for _ in range(2))
        for a, b in zip(buffered.update(k, v), dynamic.update(k, v), strict=True):
            assert torch.equal(a, b)
        buffered.crop(-3)
        dynamic.crop(-3)
        assert buffered.get_seq_length() == dynamic.get_seq_length()
        assert torch.equal(buffered.keys, dynamic.keys) and torch.equal(buffered.values, dynamic.values)
    with pytest.raises(ValueError, match="negative count"):
        buffered.crop(2)


def test_step_declines_unmerged_lora_and_training_mode(tiny_lm_dir):  # noqa: F811
    from peft import LoraConfig, get_peft_model

    vlm = build_vlm(tiny_spec(tiny_lm_dir), dtype="float32")
    assert LlamaDecodeStep.build(vlm.model) is not None
    vlm.model.train()
    assert LlamaDecodeStep.build(vlm.model) is None
    vlm.model.eval()
    lora = get_peft_model(vlm.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert LlamaDecodeStep.build(lora) is None


def test_engine_rebuilds_the_step_when_weights_change(gqa_dir):
    vlm = build_vlm(tiny_spec(gqa_dir), dtype="float32")
    engine, ids, cfg = vlm.engine, _prompts(1, seed=11)[0], SamplingConfig(max_new_tokens=16)
    before = list(engine.generate(ids, config=cfg))
    first = engine._fast
    with torch.no_grad():
        layer = vlm.model.model.language_model.layers[0]
        layer.mlp.up_proj.weight.mul_(-3.0)  # in place: the step's fused copy is now stale
    engine.reset()
    after = list(engine.generate(ids, config=cfg))
    assert engine._fast is not first and engine.stats.fast_steps == 15
    assert after == _hf_greedy(vlm, ids, 16) and after != before


@pytest.mark.smollm2
def test_smollm2_bf16_engine_tokens_are_transformers_generate():
    from toolvlm.vlm import VisionSpec, VLMSpec

    vision = VisionSpec(
        image_size=32, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1
    )
    vlm = build_vlm(VLMSpec(lm="smollm2", vision=vision), dtype="bfloat16")
    questions = [
        "What is the capital of France?",
        "Describe a meadow with a tree and some people in two sentences.",
        "Count from one to ten in words.",
        "Write a haiku about rain.",
        "What colour is the sky on a clear day, and why?",
        "Give three tips for staying focused.",
    ]
    engine, fast_steps = vlm.engine, 0
    for question in questions:
        ids = vlm.render([{"role": "user", "content": question}], add_generation_prompt=True).input_ids
        engine.reset()
        cfg = SamplingConfig(max_new_tokens=48, stop_token_ids=vlm.stop_token_ids)
        tokens = list(engine.generate(ids, config=cfg))
        fast_steps += engine.stats.fast_steps
        expected = _hf_greedy(vlm, ids, 48)  # stops after the end of turn, which the engine does not yield
        assert tokens == expected[: len(tokens)], f"{question!r}: the engine's greedy tokens differ"
        rest = expected[len(tokens) :]
        assert rest == [] or (len(rest) == 1 and rest[0] in vlm.stop_token_ids)
    assert fast_steps > 6 * 20
