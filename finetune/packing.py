"""Throughput pieces of training: packing, cached vision features, and the packed forward pass.

- `pack_groups`: several rendered conversations go into one sequence of at most `pack_tokens` tokens (first
  fit over a shuffled order), so no compute is spent on padding.
- `collate_packed`: one packed row. Position ids restart at 0 for every conversation, and the row's sequence
  boundaries (`cu_seq_lens`, as flash-attention varlen takes them) go to the attention: `varlen_attention`, an
  attention function registered with transformers, runs causal SDPA on each conversation's slice, so no token
  attends across conversations and no (L x L) mask is built (on CPU a masked SDPA falls back to the math kernel
  and stores (heads x L x L) probabilities per layer; per-slice causal SDPA keeps the flash kernel).
- `VisionFeatureCache`: with the vision tower frozen its features never change, so each image is encoded once
  (keyed by file path or pixel hash) and kept; the trainable projector runs on the cached features each step.
- `PackedForward`: embeds the row, puts the projected image features at the image tokens, runs the language
  model, and takes logits only where a label is set (assistant tokens), skipping the LM head elsewhere.

It knows LLaVA-family models and token ids; not files, recipes or optimizers.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from toolvlm.finetune.data import RenderedExample
from toolvlm.vlm.images import ImageLike, load_image

IGNORE_INDEX = -100
VARLEN = "toolvlm_varlen"


def varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA on each packed sequence's slice (bounds in `cu_seq_lens_q`); plain SDPA without them."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    cuts = bounds.tolist()
    pieces = [
        nn.functional.scaled_dot_product_attention(
            query[:, :, a:b],
            key[:, :, a:b],
            value[:, :, a:b],
            dropout_p=dropout,
            scale=scaling,
            is_causal=True,
        )
        for a, b in zip(cuts[:-1], cuts[1:], strict=True)
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(VARLEN, varlen_attention)
# Calls without sequence bounds (generation, padded batches) get SDPA's own masks, so a model left on this
# attention behaves exactly as with "sdpa".
AttentionMaskInterface.register(VARLEN, sdpa_mask)


def sequence_bounds(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative bounds [0, n1, n1 + n2, ..., L] of the sequences in a packed row (positions restart at 0)."""
    starts = torch.nonzero(position_ids[0] == 0).flatten()
    end = torch.tensor([position_ids.shape[1]], device=position_ids.device)
    return torch.cat([starts, end]).to(torch.int32)


def pack_groups(lengths: Sequence[int], pack_tokens: int, seed: int, packing: bool = True) -> list[list[int]]:
    """Groups of example indices, each fitting in `pack_tokens` (first fit over an order shuffled by `seed`)."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    if not packing:
        return [[i] for i in order]
    groups: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = min(lengths[i], pack_tokens)
        for g, free in enumerate(room):
            if n <= free:
                groups[g].append(i)
                room[g] -= n
                break
        else:
            groups.append([i])
            room.append(pack_tokens - n)
    return groups


@dataclass
class PackedBatch:
    """One packed row: ids and restarting positions, where loss is taken, and the images in order."""

    input_ids: torch.Tensor  # (1, L)
    position_ids: torch.Tensor  # (1, L)
    label_positions: torch.Tensor  # (K,) positions whose next token is a target
    targets: torch.Tensor  # (K,)
    images: list[ImageLike] = field(default_factory=list)  # paths or PIL images, loaded on a cache miss
    image_keys: list[str] = field(default_factory=list)
    n_examples: int = 0

    @property
    def n_tokens(self) -> int:
        """Tokens in the row."""
        return int(self.input_ids.shape[1])


def collate_packed(items: Sequence[RenderedExample]) -> PackedBatch:
    """Concatenate rendered examples into one row with per-example positions and shifted targets."""
    ids: list[int] = []
    positions: list[int] = []
    label_positions: list[int] = []
    targets: list[int] = []
    images: list[ImageLike] = []
    keys: list[str] = []
    for item in items:
        offset = len(ids)
        ids.extend(item.input_ids)
        positions.extend(range(len(item.input_ids)))
        for t in range(len(item.labels) - 1):
            if item.labels[t + 1] != IGNORE_INDEX:
                label_positions.append(offset + t)
                targets.append(item.labels[t + 1])
        images.extend(item.images)
        keys.extend(item.image_keys)
    return PackedBatch(
        torch.tensor([ids]), torch.tensor([positions]), torch.tensor(label_positions, dtype=torch.long),
        torch.tensor(targets, dtype=torch.long), images, keys, len(items),
    )  # fmt: skip


def llava_of(model: nn.Module) -> nn.Module:
    """The LlavaForConditionalGeneration inside a (peft-wrapped) model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def image_token_id(config: Any) -> int:
    """The image placeholder id of a LLaVA config."""
    value = getattr(config, "image_token_id", None)
    return value if value is not None else config.image_token_index


class VisionFeatureCache:
    """Vision-tower features (before the projector) per image key, computed once when the tower is frozen."""

    def __init__(
        self, vlm: Any, enabled: bool = True, max_mb: float = 4096, dtype: torch.dtype | None = None
    ):
        self.vlm = vlm
        self.enabled = enabled
        self.max_bytes = max_mb * 2**20
        self.dtype = dtype  # e.g. bf16 under bf16 autocast, where the projector computes in bf16 anyway
        self.features: dict[str, torch.Tensor] = {}
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.features)

    @torch.no_grad()
    def encode(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Selected vision features of `images`: (n, patches, dim), as LLaVA feeds its projector."""
        images = [load_image(im) for im in images]
        llava = llava_of(self.vlm.model)
        config = llava.config
        pixels = self.vlm.pixel_values(images).to(next(llava.parameters()).device)
        tower = llava.model.vision_tower
        pixels = pixels.to(next(tower.parameters()).dtype)
        hidden = tower(pixels, output_hidden_states=True, return_dict=True).hidden_states
        layer = config.vision_feature_layer
        if isinstance(layer, int):
            selected = hidden[layer]
            if config.vision_feature_select_strategy == "default":
                selected = selected[:, 1:]
        else:
            pool = [
                hidden[i][:, 1:] if config.vision_feature_select_strategy == "default" else hidden[i]
                for i in layer
            ]
            selected = torch.cat(pool, dim=-1)
        return selected

    def get(self, images: Sequence[ImageLike], keys: Sequence[str]) -> torch.Tensor | None:
        """Features of the images of a batch (cached ones reused), or None without images."""
        if not images:
            return None
        if not self.enabled:
            return self.encode(images)
        missing = [i for i, k in enumerate(keys) if k not in self.features]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if not missing:
            return torch.stack([self.features[k] for k in keys])
        encoded = self.encode([images[i] for i in missing])
        if self.dtype is not None:
            encoded = encoded.to(self.dtype)
        fresh = {keys[i]: encoded[row] for row, i in enumerate(missing)}
        for key, value in fresh.items():
            size = value.numel() * value.element_size()
            if self.bytes + size <= self.max_bytes:  # beyond the budget, features are computed each time
                self.features[key] = value.clone()
                self.bytes += size
        return torch.stack([self.features.get(k, fresh.get(k)) for k in keys])


class PackedForward(nn.Module):
    """Loss of a packed row: image features at image tokens, logits only at supervised positions."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # set for the whole run, not per call: activation checkpointing recomputes layers during backward
        self._config = llava_of(model).model.language_model.config
        self._before = self._config._attn_implementation
        self._config._attn_implementation = VARLEN

    def restore_attention(self) -> None:
        """Give the language model back its own attention implementation (after training)."""
        self._config._attn_implementation = self._before

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        image_features: torch.Tensor | None,
        label_positions: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        """Mean cross-entropy over the supervised tokens of the row."""
        hidden = self.hidden_states(input_ids, position_ids, image_features)
        llava = llava_of(self.model)
        logits = llava.lm_head(hidden[0, label_positions]).float()
        return nn.functional.cross_entropy(logits, targets)

    def hidden_states(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, image_features: torch.Tensor | None
    ) -> torch.Tensor:
        """The language model's last hidden states for a packed row (1, L, D)."""
        llava = llava_of(self.model)
        core = llava.model
        embeds = core.get_input_embeddings()(input_ids)
        mask = input_ids == image_token_id(llava.config)
        n_tokens = int(mask.sum())
        if image_features is not None:
            projected = core.multi_modal_projector(image_features)
            projected = projected.reshape(-1, projected.shape[-1]).to(embeds.dtype)
            if n_tokens != projected.shape[0]:
                raise ValueError(
                    f"Image features and image tokens do not match: tokens: {n_tokens}, features: {projected.shape[0]}"
                )
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), projected)
        elif n_tokens:
            raise ValueError(f"the row has {n_tokens} image tokens but no image features were given")
        bounds = sequence_bounds(position_ids)
        longest = int((bounds[1:] - bounds[:-1]).max())
        out = core.language_model(
            inputs_embeds=embeds, position_ids=position_ids, use_cache=False, cu_seq_lens_q=bounds,
            cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest,
        )  # fmt: skip
        return out.last_hidden_state

    def logits(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, image_features: torch.Tensor | None
    ) -> torch.Tensor:
        """Logits at every position of a packed row (for tests and checks)."""
        return llava_of(self.model).lm_head(self.hidden_states(input_ids, position_ids, image_features))
