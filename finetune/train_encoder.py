"""Stage 1: the world vision encoder, CLIP-style contrastive pretraining of a small OWL-ViT (= CLIP) model.

The model is transformers' `OwlViTModel` (a vision tower, a text tower, projections and a learned temperature
`logit_scale`), so the detector (train_detector) starts from exactly these weights, as OWL-ViT does. Texts are
the scene's caption, or a presence statement ('a photo with a dog' / 'a photo with no cars'). The loss is
CLIP's symmetric InfoNCE with similarities s_ij = cos(img_i, txt_j) / tau (tau = 1 / exp(logit_scale),
learned); a presence statement is usually true of several images of a batch, so every text true of an image
counts as a positive (multi-positive InfoNCE: -log sum_pos exp(s) / sum_all exp(s)), which is CLIP's loss when
each text is true of its own image only. With `w_presence`, each image is also classified against the pair
('a photo with a dog', 'a photo with no dogs') of every category, the softmax over the two similarities with
the same temperature (CLIP's zero-shot classifier, here supervised): the batch's many images with clouds make
'a photo with a cloud' a weak InfoNCE positive, and this term asks the question the zero-shot test asks.

A run can start from a trained encoder's export (`continue_from`, its tokenizer kept) instead of from scratch,
optionally with `add_layers` new vision layers on top (each starting as the identity) and the tower's first
`freeze_layers` layers kept as they are, so that the class token can read finished patch tokens again (tried on
the detector's tower, `world_encoder_deeper.yaml`: its presence fell below the encoder trained whole).

Export (`export/`): the OwlViTModel with its tokenizer and an OwlViTProcessor, and `vision/`, the vision tower
as a `CLIPVisionModel` folder (weights mapped one to one) for the VLM builder (`VisionSpec(checkpoint=...)`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from toolvlm.finetune.train_common import (
    deepen_vision,
    fp16_copy,
    freeze_vision,
    load_trained,
    vit_shape,
)
from toolvlm.finetune.train_loop import TrainConfig
from toolvlm.finetune.world_data import (
    CLIP_MEAN,
    CLIP_STD,
    WorldScenes,
    contrastive_text,
    presence_prompts,
    present_categories,
    text_matches,
)
from toolvlm.finetune.world_tokenizer import build_tokenizer, special_ids
from toolvlm.world import CATEGORIES

log = logging.getLogger(__name__)


@dataclass
class EncoderConfig(TrainConfig):
    """Contrastive pretraining of the world encoder."""

    run_dir: str = "runs/encoder"
    steps: int = 800
    batch_size: int = 32
    lr: float = 5e-4
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 256
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 256
    text_layers: int = 3
    text_heads: int = 4
    projection_dim: int = 256
    max_length: int = 64
    p_caption: float = 0.5
    w_presence: float = 0.0  # weight of the presence loss (CLIP zero-shot classification as a training task)
    tokenizer_scenes: int = 400  # scenes whose texts the BPE merges are learned from
    continue_from: str = ""  # a trained encoder's export folder to train on (its tokenizer and sizes)
    add_layers: int = 0  # vision layers put on top of the continued tower, starting as the identity
    freeze_layers: int = 0  # the continued tower's embeddings and first layers kept as they are


def owlvit_config(c: EncoderConfig, tokenizer: Any) -> Any:
    """The OwlViTConfig of the recipe's sizes."""
    from transformers import OwlViTConfig

    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=c.text_width,
        intermediate_size=4 * c.text_width,
        num_hidden_layers=c.text_layers,
        num_attention_heads=c.text_heads,
        max_position_embeddings=c.max_length,
        **special_ids(tokenizer),
    )
    vision = vit_shape(c)
    return OwlViTConfig(text_config=text, vision_config=vision, projection_dim=c.projection_dim)


def owlvit_processor(tokenizer: Any, image_size: int) -> Any:
    """An OwlViTProcessor for square world images of `image_size` pixels."""
    from transformers import OwlViTProcessor
    from transformers.models.owlvit import OwlViTImageProcessorPil

    images = OwlViTImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return OwlViTProcessor(image_processor=images, tokenizer=tokenizer)


def clip_vision_from_owlvit(owl_vision: Any) -> Any:
    """A CLIPVisionModel with the weights of an OWL-ViT vision tower (names mapped; outputs equal)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vc = owl_vision.config
    config = CLIPVisionConfig(
        hidden_size=vc.hidden_size,
        intermediate_size=vc.intermediate_size,
        num_hidden_layers=vc.num_hidden_layers,
        num_attention_heads=vc.num_attention_heads,
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        num_channels=vc.num_channels,
        hidden_act=vc.hidden_act,
        layer_norm_eps=vc.layer_norm_eps,
    )
    clip = CLIPVisionModel(config)
    state = {k.replace("pre_layernorm", "pre_layrnorm"): v for k, v in owl_vision.state_dict().items()}
    missing, unexpected = clip.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"OWL-ViT -> CLIP vision mapping failed: missing {missing}, unexpected {unexpected}")
    return clip.to(next(owl_vision.parameters()).dtype).eval()


def multi_positive_infonce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a (B, B) logit matrix with a boolean matrix of positives (diagonal included)."""
    logits = logits.float()
    neg_inf = torch.finfo(logits.dtype).min

    def one_side(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return (torch.logsumexp(x, dim=1) - torch.logsumexp(x.masked_fill(~pos, neg_inf), dim=1)).mean()

    return 0.5 * (one_side(logits, positives) + one_side(logits.t(), positives.t()))


class EncoderStage:
    """OwlViTModel trained contrastively on world image/text pairs."""

    def __init__(self, config: EncoderConfig) -> None:
        from transformers import OwlViTModel

        self.config = config
        if config.continue_from:
            self.model, self.tokenizer = load_trained(OwlViTModel, config.continue_from, config)
            self.model = deepen_vision(self.model, config.add_layers)
            config.vision_layers = self.model.config.vision_config.num_hidden_layers
            freeze_vision(self.model, config.freeze_layers)
        elif config.add_layers or config.freeze_layers:
            raise ValueError("add_layers and freeze_layers grow and keep a trained tower: set continue_from")
        else:
            self.tokenizer = build_tokenizer(config.max_length, n_scenes=config.tokenizer_scenes)
            self.model = OwlViTModel(owlvit_config(config, self.tokenizer))
        self.data = WorldScenes("train", length=10**8, image_size=config.image_size)

    def batch(self, step: int) -> dict[str, Any]:
        """Images of scenes step*B .. (step+1)*B-1, one text each, and the positives matrix."""
        c = self.config
        rng = random.Random(c.seed * 1_000_003 + step)
        items = [self.data[step * c.batch_size + i] for i in range(c.batch_size)]
        texts, keys = zip(*(contrastive_text(it["ann"], rng, c.p_caption) for it in items), strict=True)
        anns = [it["ann"] for it in items]
        positives = torch.tensor(
            [
                [text_matches(a, keys[j], own=i == j or a["caption"] == texts[j]) for j in range(len(anns))]
                for i, a in enumerate(anns)
            ]
        )
        presence = torch.tensor([[c in present_categories(a) for c in CATEGORIES] for a in anns])
        if c.w_presence > 0:  # the 2 x K presence prompts ride along after the batch's texts
            texts = (*texts, *presence_prompts())
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=c.max_length, return_tensors="pt"
        )
        pixels = torch.stack([it["pixels"] for it in items])
        return {"pixels": pixels, "tokens": tokens, "positives": positives, "presence": presence}

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Multi-positive symmetric InfoNCE with the learned temperature."""
        out = self.model(
            input_ids=batch["tokens"]["input_ids"],
            attention_mask=batch["tokens"]["attention_mask"],
            pixel_values=batch["pixels"],
        )
        n = len(batch["positives"])
        logits = out.logits_per_image.float()
        loss = multi_positive_infonce(logits[:, :n], batch["positives"])
        with torch.no_grad():
            hits = logits[:, :n].argmax(dim=1)
            acc = batch["positives"][torch.arange(len(hits)), hits].float().mean()
        figures = {"acc": float(acc), "scale": float(self.model.logit_scale.detach().exp())}
        if self.config.w_presence > 0:
            k = len(CATEGORIES)
            pairs = torch.stack([logits[:, n + k :], logits[:, n : n + k]], dim=-1)  # (B, K, [no, with])
            target = batch["presence"].long()
            presence_loss = F.cross_entropy(pairs.reshape(-1, 2), target.reshape(-1))
            loss = loss + self.config.w_presence * presence_loss
            figures["presence"] = float(presence_loss.detach())
            figures["presence_acc"] = float((pairs.argmax(-1) == target).float().mean())
        return loss, figures

    def export(self, folder: Path) -> None:
        """OwlViTModel + processor in export/, the CLIPVisionModel in export/vision/ (fp16)."""
        folder.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(max=4.6052)  # CLIP's cap: temperature >= 1/100
        half = fp16_copy(self.model)
        half.save_pretrained(folder)
        owlvit_processor(self.tokenizer, self.config.image_size).save_pretrained(folder)
        clip_vision_from_owlvit(half.vision_model).save_pretrained(folder / "vision")
        owlvit_processor(self.tokenizer, self.config.image_size).image_processor.save_pretrained(
            folder / "vision"
        )
