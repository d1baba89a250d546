"""Assemble a LLaVA-style VLM from parts: a CLIP/SigLIP vision encoder, LLaVA-1.5's projector and a causal LM.

The result is transformers' `LlavaForConditionalGeneration` (or its pooling subclass, see `architecture.py`) with
a matching `LlavaProcessor`: a PIL image processor that resizes to the encoder's square input (no cropping, so
boxes and positions in the picture survive), the LM's tokenizer with an added image token, and a ChatML chat
template. The vision tower is fresh (random) unless a local checkpoint is named; the LM's weights are copied in.

This module knows how to put parts together; loading saved models and generation live elsewhere.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from .architecture import (
    ToolVLMConfig,
    ToolVLMForConditionalGeneration,
    cast_keeping_rotary,
    grow_embeddings,
    image_tokens_per_image,
)
from .base_lm import load_causal_lm
from .chat import chatml_template
from .config import VisionSpec, VLMSpec, resolve_dtype

logger = logging.getLogger(__name__)

VISION_KINDS = ("clip", "siglip")


def vision_config_from_spec(spec: VisionSpec):
    """A vision-encoder config: read from a local checkpoint, or a fresh CLIP/SigLIP of the given shape."""
    if spec.checkpoint:
        if not Path(spec.checkpoint, "config.json").is_file():
            raise FileNotFoundError(f"vision checkpoint not found (no config.json): {spec.checkpoint}")
        config = AutoConfig.from_pretrained(spec.checkpoint)
        config = getattr(config, "vision_config", config)  # a full CLIP/SigLIP model: take its vision half
        if config.model_type not in ("clip_vision_model", "siglip_vision_model"):
            raise ValueError(
                f"unsupported vision encoder {config.model_type!r}: use a CLIP or SigLIP checkpoint"
            )
        return config
    shape = dict(
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
    )
    if spec.kind == "clip":
        return CLIPVisionConfig(**shape)
    if spec.kind == "siglip":
        return SiglipVisionConfig(**shape)
    raise ValueError(f"unknown vision encoder kind {spec.kind!r}; known: {', '.join(VISION_KINDS)}")


def image_processor_for(vision_config, checkpoint: str | None = None):
    """A PIL image processor resizing to the encoder's square input with its normalisation."""
    size = {"height": vision_config.image_size, "width": vision_config.image_size}
    if checkpoint and Path(checkpoint, "preprocessor_config.json").is_file():
        proc = AutoImageProcessor.from_pretrained(checkpoint, backend="pil")
        proc.size, proc.do_center_crop = size, False
        return proc
    if vision_config.model_type.startswith("siglip"):
        return SiglipImageProcessorPil(size=size)
    return CLIPImageProcessorPil(size=size, do_center_crop=False, crop_size=size)


def add_image_token(tokenizer, image_token: str) -> int:
    """Add `image_token` to the tokenizer as a special token (if absent) and return its id."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([image_token], special_tokens=True)
    ids = tokenizer.encode(image_token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"image token {image_token!r} does not encode to one id: {ids}")
    tokenizer.image_token = image_token
    return ids[0]


def build_processor(spec: VLMSpec, config: LlavaConfig, tokenizer, image_processor) -> LlavaProcessor:
    """A `LlavaProcessor` whose image-token count matches the model's features (pooling included)."""
    vision = config.vision_config
    pooling = getattr(config, "image_token_pooling", 1)
    is_clip = vision.model_type.startswith("clip")
    template = chatml_template(spec.image_token) if spec.chat_format == "chatml" else tokenizer.chat_template
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size * pooling,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if is_clip else 0,
        chat_template=template,
        image_token=spec.image_token,
    )
    expected = image_tokens_per_image(config)
    got = (vision.image_size // (vision.patch_size * pooling)) ** 2
    if expected != got:
        raise ValueError(f"processor and model disagree on image tokens: processor {got}, model {expected}")
    return processor


def assemble(spec: VLMSpec, dtype: str | torch.dtype = "auto"):
    """Build (model, processor, spec) from parts; the LM and, if named, the vision checkpoint are loaded."""
    torch_dtype = resolve_dtype(dtype)
    lm, tokenizer = load_causal_lm(spec.lm, dtype=torch_dtype)
    image_token_id = add_image_token(tokenizer, spec.image_token)
    if image_token_id >= lm.get_input_embeddings().weight.shape[0]:
        grow_embeddings(lm, len(tokenizer))
    vision_config = vision_config_from_spec(spec.vision)
    is_clip = vision_config.model_type.startswith("clip")
    common = dict(
        vision_config=vision_config,
        text_config=lm.config,
        image_token_index=image_token_id,
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy="default" if is_clip else "full",
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    if spec.image_token_pooling > 1:
        config = ToolVLMConfig(image_token_pooling=spec.image_token_pooling, **common)
        model_class = ToolVLMForConditionalGeneration
    else:
        config = LlavaConfig(**common)
        model_class = LlavaForConditionalGeneration
    config.image_seq_length = image_tokens_per_image(config)
    with torch.device("meta"):  # the shell only: its parts are put in below, nothing is initialised twice
        model = model_class(config)
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    tower_class = type(model.model.vision_tower)
    if spec.vision.checkpoint:  # the vision model class reads a full CLIP/SigLIP checkpoint's vision half too
        model.model.vision_tower = tower_class.from_pretrained(
            spec.vision.checkpoint, dtype=torch.float32, use_safetensors=True
        )
    else:
        model.model.vision_tower = tower_class(vision_config)
    model.model.multi_modal_projector = type(model.model.multi_modal_projector)(config)
    empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise RuntimeError(f"assembling the VLM left tensors without values: {empty[:5]}")
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    cast_keeping_rotary(model, torch_dtype).eval()
    processor = build_processor(
        spec, config, tokenizer, image_processor_for(vision_config, spec.vision.checkpoint)
    )
    logger.info(
        "assembled a VLM: %s + %s (%d image tokens) + %s, %s",
        vision_config.model_type, type(model.model.multi_modal_projector).__name__,
        config.image_seq_length, lm.config.model_type, torch_dtype,
    )  # fmt: skip
    return model, processor


def build_vlm(spec: VLMSpec | None = None, dtype: str | torch.dtype = "auto"):
    """Assemble a VLM from parts (default: a fresh CLIP encoder + SmolLM2-135M-Instruct) as a `VLM`."""
    from .model import VLM

    spec = spec or VLMSpec()
    model, processor = assemble(spec, dtype)
    return VLM(model, processor, spec)
