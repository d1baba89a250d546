"""The LLaVA architecture with optional image-token pooling, self-contained so that it ships with a checkpoint.

Without pooling a toolvlm model *is* transformers' `LlavaForConditionalGeneration` (model type "llava"): its
folder loads in plain transformers with no toolvlm code. With pooling (`image_token_pooling > 1`) the projector
average-pools the patch grid k x k before LLaVA-1.5's two-layer GELU MLP, cutting image tokens k^2-fold; that
needs one extra config field, so such a model is saved as model type "toolvlm_llava", a thin subclass registered
with transformers' Auto classes when this module is imported. Behaviour comes from the saved config, never from
a path name.

This file imports only torch, transformers and huggingface_hub, never toolvlm: `vlm/export.py` copies it into a
saved folder as `modeling_toolvlm_llava.py` and names its classes in config.json's `auto_map`, so
`AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)` loads the model without toolvlm.

A folder whose config has `parts` holds no base weights (a portable controller: a LoRA adapter, its projector and
a vision tower); `from_pretrained` then assembles the base from its parts: the language model named by
`parts["language_model"]` (a hub id or a local folder; the keyword `language_model=` overrides it), the vision
tower in the subfolder `parts["vision_tower"]` and a fresh projector; the folder's adapter (LoRA and the trained
projector) is then applied by transformers' peft integration, as for any folder with an adapter_config.json.

This module knows the model classes only: not tokenizers, chat templates or generation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaModel,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

MODEL_TYPE = "toolvlm_llava"


@strict
class ToolVLMConfig(LlavaConfig):
    """`LlavaConfig` plus `image_token_pooling`: the side of the square window averaged into one image token;
    `parts` (optional): where a base without saved weights takes its language model and vision tower."""

    model_type = MODEL_TYPE

    image_token_pooling: int = 2
    parts: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.image_token_pooling < 1:
            raise ValueError(f"image_token_pooling must be >= 1, got {self.image_token_pooling}")
        if self.parts is not None and set(self.parts) != {"language_model", "vision_tower"}:
            raise ValueError(f"parts must name language_model and vision_tower, got {sorted(self.parts)}")


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


def grow_embeddings(lm: nn.Module, vocab_size: int) -> None:
    """Grow the LM's embeddings (and an untied output head) to `vocab_size` rows, padded to a multiple of 64;
    new rows are the mean of the old ones.

    The mean, not a random draw: a base rebuilt from its parts (a portable adapter's) must come out the same every
    time, and the image token's row is never an input (image features replace it). Grown in place rather than by
    `resize_token_embeddings`, which first fills a whole new matrix with random values (a third of a second for
    SmolLM2's 49k x 576 at every load)."""
    rows = -(-vocab_size // 64) * 64
    embeddings = lm.get_input_embeddings()
    head = lm.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embeddings.weight.data_ptr()

    def grown(weight: torch.Tensor) -> nn.Parameter:
        old_rows = weight.shape[0]
        new = weight.new_empty((rows, weight.shape[1]))
        new[:old_rows] = weight
        new[old_rows:] = weight.mean(dim=0)
        return nn.Parameter(new, requires_grad=weight.requires_grad)

    with torch.no_grad():
        embeddings.weight = grown(embeddings.weight)
        embeddings.num_embeddings = rows
        if head is not None:
            head.weight = embeddings.weight if tied else grown(head.weight)
            head.out_features = rows
    lm.config.get_text_config().vocab_size = rows


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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load a saved model; a folder whose config names `parts` is assembled from them (module docstring)."""
        config = kwargs.get("config")
        if not isinstance(config, ToolVLMConfig):
            config = ToolVLMConfig.from_pretrained(pretrained_model_name_or_path)
        if config.parts is None:
            kwargs.pop("language_model", None)
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        return cls._from_parts(str(pretrained_model_name_or_path), config, kwargs)

    @classmethod
    def _from_parts(cls, source: str, config: ToolVLMConfig, kwargs: dict[str, Any]):
        dtype = kwargs.get("dtype") or kwargs.get("torch_dtype")
        dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32  # "auto" or unset: fp32
        hub = {k: kwargs[k] for k in ("cache_dir", "local_files_only", "token", "revision") if k in kwargs}
        lm_source = kwargs.get("language_model") or config.parts["language_model"]
        lm = AutoModelForCausalLM.from_pretrained(lm_source, dtype=dtype, **hub)
        vocab = config.text_config.vocab_size
        if lm.get_input_embeddings().weight.shape[0] != vocab:
            grow_embeddings(lm, vocab)
        lm_vocab = lm.get_input_embeddings().weight.shape[0]
        if lm_vocab != vocab:
            raise ValueError(
                f"the language model {lm_source} has {lm_vocab} embedding rows after growing, this model's "
                f"config {vocab}: it is not the base this controller was trained on"
            )
        tower = config.parts["vision_tower"]
        # a local folder by its path: loaded as a subfolder, transformers would find the adapter above it
        if Path(source, tower).is_dir():
            vision = AutoModel.from_pretrained(Path(source, tower), dtype=torch.float32)
        else:
            vision = AutoModel.from_pretrained(source, subfolder=tower, dtype=torch.float32, **hub)
        with torch.device("meta"):  # the shell only: its parts are put in below
            model = cls(config)
        model.model.language_model = lm.model
        model.lm_head = lm.lm_head
        model.model.vision_tower = vision
        model.model.multi_modal_projector = PooledProjector(config)  # replaced by the adapter's trained one
        model.tie_weights()
        cast_keeping_rotary(model, dtype).eval()
        adapter = (kwargs.get("adapter_kwargs") or {}).get("_adapter_model_path")
        if adapter is None and Path(source, "adapter_config.json").is_file():  # called without the Auto class
            adapter = source
        if adapter is not None:  # what PreTrainedModel.from_pretrained does for a folder with an adapter
            model.load_adapter(adapter, adapter_kwargs=hub)
            model.eval()
        return model


def cast_keeping_rotary(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model.to(dtype)` with the rotary `inv_freq` buffers left in fp32, as `from_pretrained(dtype=...)` leaves
    them (a bf16 inv_freq turns position p's angles by up to p * 0.2%: another model than the one trained)."""
    kept = {name: buffer for name, buffer in model.named_buffers() if name.endswith("inv_freq")}
    model.to(dtype)
    for name, buffer in kept.items():
        owner, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(owner), attribute, buffer)
    return model


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


AutoConfig.register(MODEL_TYPE, ToolVLMConfig, exist_ok=True)
AutoModelForImageTextToText.register(ToolVLMConfig, ToolVLMForConditionalGeneration, exist_ok=True)
