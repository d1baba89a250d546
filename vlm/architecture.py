"""The LLaVA architecture with optional image-token pooling.

Without pooling a toolvlm model *is* transformers' `LlavaForConditionalGeneration` (model type "llava"): its
folder loads in plain transformers with no toolvlm code. With pooling (`image_token_pooling > 1`) the projector
average-pools the patch grid k x k before LLaVA-1.5's two-layer GELU MLP, cutting image tokens k^2-fold; that
needs one extra config field, so such a model is saved as model type "toolvlm_llava", a thin subclass registered
with transformers' Auto classes when this module is imported. Behaviour comes from the saved config, never from
a path name.

This module knows the model classes only: not tokenizers, chat templates or generation.
"""

from __future__ import annotations

import math

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaModel,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector


@strict
class ToolVLMConfig(LlavaConfig):
    """`LlavaConfig` plus `image_token_pooling`: the side of the square window averaged into one image token."""

    model_type = "toolvlm_llava"

    image_token_pooling: int = 2

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.image_token_pooling < 1:
            raise ValueError(f"image_token_pooling must be >= 1, got {self.image_token_pooling}")


def pool_patch_grid(features: torch.Tensor, pooling: int) -> torch.Tensor:
    """Average-pool (batch, n_patches, dim) features laid out on a square grid by `pooling` x `pooling`."""
    if pooling == 1:
        return features
    batch, n, dim = features.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"image token pooling needs a square patch grid, got {n} patch features")
    if side % pooling:
        raise ValueError(f"patch grid side {side} is not divisible by image_token_pooling={pooling}")
    grid = features.transpose(1, 2).reshape(batch, dim, side, side)
    pooled = nn.functional.avg_pool2d(grid, kernel_size=pooling, stride=pooling)
    return pooled.flatten(2).transpose(1, 2)


class PooledProjector(LlavaMultiModalProjector):
    """LLaVA-1.5's projector (linear, GELU, linear) applied after k x k average pooling of the patch grid."""

    def __init__(self, config: ToolVLMConfig):
        super().__init__(config)
        self.pooling = config.image_token_pooling

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return super().forward(pool_patch_grid(image_features, self.pooling))


class ToolVLMModel(LlavaModel):
    """`LlavaModel` whose projector pools image tokens."""

    config_class = ToolVLMConfig

    def __init__(self, config: ToolVLMConfig):
        super().__init__(config)
        self.multi_modal_projector = PooledProjector(config)
        self.post_init()


class ToolVLMForConditionalGeneration(LlavaForConditionalGeneration):
    """`LlavaForConditionalGeneration` with a pooling projector (model type "toolvlm_llava")."""

    config_class = ToolVLMConfig

    def __init__(self, config: ToolVLMConfig):
        super().__init__(config)
        self.model = ToolVLMModel(config)
        self.post_init()


def image_tokens_per_image(config: LlavaConfig) -> int:
    """Number of image tokens the LLM sees for one image under `config`."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    n = side * side
    if config.vision_feature_select_strategy == "full" and vision.model_type.startswith("clip"):
        n += 1  # CLIP's CLS token is kept
    pooling = getattr(config, "image_token_pooling", 1)
    if pooling > 1:
        if n != side * side:
            raise ValueError("image token pooling needs vision_feature_select_strategy='default' for CLIP")
        n = (side // pooling) ** 2
    return n


AutoConfig.register("toolvlm_llava", ToolVLMConfig, exist_ok=True)
AutoModelForImageTextToText.register(ToolVLMConfig, ToolVLMForConditionalGeneration, exist_ok=True)
