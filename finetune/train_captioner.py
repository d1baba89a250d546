"""Stage 3: the default captioner, transformers' BLIP architecture (BlipForConditionalGeneration) at small size.

A ViT image encoder and a BERT-style text decoder with cross-attention, trained from scratch with the
language-modelling loss on world captions (or trained further from a captioner's export folder,
`continue_from`, whose tokenizer it keeps; a recipe at another `image_size` interpolates the tower's position
embeddings): the one-sentence caption, or (with probability `p_paragraph`) the paragraph, which starts
differently ('The picture shows ...'), so greedy decoding from the bare BOS gives the sentence the captioner tool
expects. Text uses the world byte-level BPE tokenizer (open vocabulary; BOS starts the decoder, EOS ends a
caption, a separate PAD is masked out of the loss). Export: the model with a BlipProcessor, the format of the
tools' `inhouse` captioner backend.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolvlm.finetune.train_common import fp16_copy, load_trained, vit_shape
from toolvlm.finetune.train_loop import TrainConfig
from toolvlm.finetune.world_data import CLIP_MEAN, CLIP_STD, WorldScenes, caption_text
from toolvlm.finetune.world_tokenizer import build_tokenizer, special_ids

log = logging.getLogger(__name__)


@dataclass
class CaptionerConfig(TrainConfig):
    """BLIP captioner sizes and caption mix."""

    run_dir: str = "runs/captioner"
    steps: int = 600
    batch_size: int = 16
    lr: float = 5e-4
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 192
    vision_layers: int = 4
    vision_heads: int = 3
    text_width: int = 192
    text_layers: int = 2
    text_heads: int = 3
    max_length: int = 160
    p_paragraph: float = 0.2
    tokenizer_scenes: int = 400  # scenes whose texts the BPE merges are learned from
    continue_from: str = ""  # a trained captioner's export folder to train on (its tokenizer and sizes)
    scene_offset: int = 0  # where its training scenes start (a continued run can draw fresh ones)


def blip_config(c: CaptionerConfig, tokenizer: Any) -> Any:
    """The BlipConfig of the recipe's sizes."""
    from transformers import BlipConfig

    ids = special_ids(tokenizer)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=c.text_width,
        encoder_hidden_size=c.vision_width,
        intermediate_size=4 * c.text_width,
        num_hidden_layers=c.text_layers,
        num_attention_heads=c.text_heads,
        max_position_embeddings=c.max_length,
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        sep_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
    )
    vision = vit_shape(c)
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=c.text_width)


def blip_processor(tokenizer: Any, image_size: int) -> Any:
    """A BlipProcessor for square world images."""
    from transformers import BlipProcessor
    from transformers.models.blip import BlipImageProcessorPil

    images = BlipImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)
    )
    return BlipProcessor(image_processor=images, tokenizer=tokenizer)


class CaptionerStage:
    """BlipForConditionalGeneration trained with teacher forcing on world captions."""

    def __init__(self, config: CaptionerConfig) -> None:
        from transformers import BlipForConditionalGeneration

        self.config = config
        if config.continue_from:
            self.model, self.tokenizer = load_trained(
                BlipForConditionalGeneration, config.continue_from, config
            )
        else:
            self.tokenizer = build_tokenizer(config.max_length, n_scenes=config.tokenizer_scenes)
            self.model = BlipForConditionalGeneration(blip_config(config, self.tokenizer))
        self.data = WorldScenes(
            "train", length=10**8, offset=2 * 10**7 + config.scene_offset, image_size=config.image_size
        )
        self.pad_id = special_ids(self.tokenizer)["pad_token_id"]

    def batch(self, step: int) -> dict[str, Any]:
        """Images and their caption ids (BOS ... EOS, PAD masked out of the labels)."""
        c = self.config
        rng = random.Random(c.seed * 1_000_003 + step)
        items = [self.data[step * c.batch_size + i] for i in range(c.batch_size)]
        texts = [caption_text(it["ann"], rng, c.p_paragraph) for it in items]
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=c.max_length, return_tensors="pt"
        )
        labels = tokens["input_ids"].masked_fill(tokens["input_ids"] == self.pad_id, -100)
        pixels = torch.stack([it["pixels"] for it in items])
        return {
            "pixels": pixels,
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "labels": labels,
        }

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """BLIP's captioning (language-modelling) loss."""
        out = self.model(
            pixel_values=batch["pixels"],
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        return out.loss, {}

    def export(self, folder: Path) -> None:
        """fp16 BlipForConditionalGeneration + BlipProcessor (the tools' `inhouse` captioner format)."""
        folder.mkdir(parents=True, exist_ok=True)
        fp16_copy(self.model).save_pretrained(folder)
        blip_processor(self.tokenizer, self.config.image_size).save_pretrained(folder)
