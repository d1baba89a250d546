"""Existing checkpoint formats through the same VLM interface: llava-hf and Qwen2-VL, tiny and random."""

from __future__ import annotations

import pytest
import torch
from fixtures_vlm import chat, make_tokenizer, random_image, tiny_lm_dir, tiny_spec  # noqa: F401
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from toolvlm.vlm import build_vlm, load_vlm
from toolvlm.vlm.chat import IGNORE_INDEX, TemplateRenderer

# llava-1.5-hf's chat template
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] + ' ' }}"
    "{% elif item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

QWEN_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t['name'] }} {% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def llava_hf_dir(tmp_path_factory):
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.5, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16, vision_feature_layer=-2,
    )  # fmt: skip
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_15_TEMPLATE,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("llava_hf")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


class _ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor without its video part (which needs torchvision, absent here)."""

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory):
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(
        ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"], special_tokens=True
    )
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2
    )
    processor = _ImageOnlyQwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5,
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
        ),
        vision_config=dict(depth=1, embed_dim=32, num_heads=4, hidden_size=32, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    config.text_config.bos_token_id = tokenizer.bos_token_id
    config.text_config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    folder = tmp_path_factory.mktemp("qwen2_vl")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    for name in ("processor_config.json", "tokenizer_config.json"):  # as in a real Qwen2-VL checkpoint
        path = folder / name
        path.write_text(path.read_text().replace("_ImageOnlyQwen2VLProcessor", "Qwen2VLProcessor"))
    return folder


def _hf_greedy(model, processor, messages, images, n):
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=images, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=-1)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _engine_greedy(vlm, messages, images, n):
    rendered = vlm.render(messages, images, add_generation_prompt=True)
    from toolvlm.vlm.engine import SamplingConfig

    cfg = SamplingConfig(max_new_tokens=n)
    return list(
        vlm.engine.generate(rendered.input_ids, rendered.images, rendered.image_spans, cfg, use_cache=False)
    )


def test_llava_hf_checkpoint_loads_and_engine_matches_transformers_generate(llava_hf_dir):
    vlm = load_vlm(llava_hf_dir, dtype="float32")
    assert isinstance(vlm.renderer, TemplateRenderer)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What do you see?"}]}
    ]
    images = [random_image(0)]
    assert _engine_greedy(vlm, messages, images, 8) == _hf_greedy(
        vlm.model, vlm.processor, messages, images, 8
    )
    assert isinstance(vlm.generate(messages, images, max_new_tokens=6), str)


def test_llava_hf_template_labels_cover_assistant_text_only(llava_hf_dir):
    vlm = load_vlm(llava_hf_dir, dtype="float32")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many people?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "About 85 people."}]},
    ]
    rendered = vlm.render(messages, [random_image(1)])
    supervised = [
        t for t, label in zip(rendered.input_ids, rendered.labels, strict=True) if label != IGNORE_INDEX
    ]
    assert vlm.tokenizer.decode(supervised).strip() == "About 85 people. <|im_end|>"  # the template adds " "
    assert rendered.image_spans == [(rendered.image_spans[0][0], rendered.image_spans[0][0] + 16)]


def test_built_model_engine_matches_transformers_generate(tiny_lm_dir):  # noqa: F811
    vlm = build_vlm(tiny_spec(tiny_lm_dir, pooling=2), dtype="float32")
    messages, images = chat(2), [random_image(0), random_image(1)]
    assert _engine_greedy(vlm, messages, images, 8) == _hf_greedy(
        vlm.model, vlm.processor, messages, images, 8
    )


def test_qwen2_vl_checkpoint_generates_through_the_same_interface(qwen2_vl_dir):
    vlm = load_vlm(qwen2_vl_dir, dtype="float32")
    assert not vlm.is_llava and vlm.supports_tool_template
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What do you see?"}]}
    ]
    images = [random_image(2, size=60)]
    text = vlm.generate(messages, images, max_new_tokens=8)
    assert "".join(vlm.stream(messages, images, max_new_tokens=8)) == text
    ids = vlm.tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = _hf_greedy(vlm.model, vlm.processor, messages, images, 8)
    assert vlm.tokenizer.decode(expected, skip_special_tokens=True).startswith(vlm.tokenizer.decode(ids))
    tools = [{"name": "counter", "description": "count", "parameters": {"type": "object", "properties": {}}}]
    rendered = vlm.render(messages, images, add_generation_prompt=True, tools=tools)
    assert "Tools: counter" in vlm.tokenizer.decode(rendered.input_ids)


IDEFICS3_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}:{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def idefics3_dir(tmp_path_factory):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = make_tokenizer()
    tokenizer.add_tokens(
        ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"], special_tokens=True
    )
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=False
    )
    # image_seq_len = (image_size / patch_size)^2 / scale_factor^2 = (32 / 8)^2 / 4
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE
    )
    config = Idefics3Config(
        text_config=dict(
            model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
            patch_size=8,
        ),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("idefics3")
    Idefics3ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_idefics3_smolvlm_style_checkpoint_generates(idefics3_dir):
    vlm = load_vlm(idefics3_dir, dtype="float32")
    assert vlm.model.config.model_type == "idefics3" and not vlm.is_llava
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What do you see?"}]}
    ]
    images = [random_image(4, size=60)]
    text = vlm.generate(messages, images, max_new_tokens=8)
    expected = _hf_greedy(vlm.model, vlm.processor, messages, images, 8)
    assert text == vlm.tokenizer.decode(expected, skip_special_tokens=True)
