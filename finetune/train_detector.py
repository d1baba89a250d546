"""Stage 2: the default grounding detector, OWL-ViT style, fine-tuned from the world encoder with set matching.

The model is transformers' `OwlViTForObjectDetection`: every image patch predicts a box (`box_head`, biased to
its grid cell) and a class embedding that is matched against the text-query embeddings of the same text tower
the encoder was pretrained with (`init_from`: the encoder's export folder; empty: random init; `continue_from`: a
trained detector's export, to train it further). Queries per image are world phrases: every present category
(sometimes plural), colour phrases ('person in a red shirt'), referring expressions ('the red frisbee next to the
dog', positive only on their target) and absent phrases (negatives: a few drawn, or with `all_negatives` every
absent category and colour phrase, as the evaluation asks them all).
With `generated` and `p_generated`, that share of each batch is the generator's own samples of known layouts
(finetune/generated_set.py), asked category queries only, so that counts read back on generated images.

Loss (DETR / OWL-ViT): each ground-truth object is matched one-to-one to a patch by Hungarian matching
(scipy's linear_sum_assignment) on cost = w_class * (-mean prob of the object's queries) + w_l1 * L1(box) +
w_giou * (-GIoU); matched patches learn the object's queries (multi-label: an object answers its category, its
colour phrase and the expressions that refer to it) with a sigmoid focal loss, all other patches learn "no
query"; matched boxes learn L1 + GIoU. Export: the detector with an OwlViTProcessor, the format of the tools'
`inhouse` grounding backend.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from toolvlm.finetune.generated_set import GeneratedScenes
from toolvlm.finetune.train_common import fp16_copy, load_trained, resize_vision
from toolvlm.finetune.train_encoder import (
    EncoderConfig,
    clip_vision_from_owlvit,
    owlvit_config,
    owlvit_processor,
)
from toolvlm.finetune.train_loop import TrainConfig
from toolvlm.finetune.world_data import WorldScenes, detection_target, scene_seed
from toolvlm.finetune.world_tokenizer import build_tokenizer, reorder_specials, special_ids
from toolvlm.world import CATEGORIES, WorldConfig, sample_scene

log = logging.getLogger(__name__)


@dataclass
class DetectorConfig(TrainConfig):
    """Detection fine-tuning; the architecture comes from `init_from` (or `model` sizes when it is empty)."""

    run_dir: str = "runs/detector"
    init_from: str = "runs/encoder/export"
    model: EncoderConfig | None = None  # sizes for a random init (tests); ignored with init_from
    continue_from: str = ""  # a trained detector's export folder to train on, heads included (over init_from)
    image_size: int = 0  # input pixels; 0: the model's own. Another size interpolates the position embeddings
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-4
    max_colour: int = 6
    max_referring: int = 4
    negatives: int = 4
    all_negatives: bool = False  # ask every absent category and colour phrase (then `negatives` is unused)
    # absent colour phrases of present categories asked per image ('white house' beside a red one)
    hard_negatives: int = 0
    w_class: float = 2.0
    w_l1: float = 5.0
    w_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    prior_logit: float = -4.0
    init_logit_scale: float = 10.0
    p_lowres: float = 0.2  # share of images blurred like the 64 px generator's, so counts read back on them
    generated: str = ""  # a generated set (finetune/generated_set.py): generator samples of known layouts
    p_generated: float = 0.0  # share of batch images drawn from it (category queries only)
    focus: list[str] = field(default_factory=list)  # categories to show more often (e.g. the weakest AP's)
    p_focus: float = 0.0  # share of batch images drawn from training scenes that hold one of them
    scene_offset: int = 0  # where its training scenes start (a continued run can draw fresh ones)
    p_composed: float = 0.0  # share of training scenes from the composed family (any place, size, background)
    p_scattered: float = (
        0.0  # share from the scattered family (0-60 of one kind at one scale, anywhere, occluded)
    )


def box_xyxy(b: torch.Tensor) -> torch.Tensor:
    """(..., 4) cx, cy, w, h -> x0, y0, x1, y1."""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def pairwise_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of every box of a (N, 4) with every box of b (M, 4), both xyxy -> (N, M)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = inter / union.clamp(min=1e-7)
    lt_c = torch.min(a[:, None, :2], b[None, :, :2])
    rb_c = torch.max(a[:, None, 2:], b[None, :, 2:])
    hull = (rb_c - lt_c).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-7)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Sigmoid focal loss, summed."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    weight = alpha * target + (1 - alpha) * (1 - target)
    return (weight * ce * (1 - p_t) ** gamma).sum()


def hungarian(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the minimum-cost one-to-one assignment of a (P, G) cost matrix."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.detach().float().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def load_detector_init(init_from: str, model_sizes: EncoderConfig | None) -> tuple[Any, Any]:
    """(OwlViTForObjectDetection, tokenizer): from an encoder export folder, or randomly initialised."""
    from transformers import AutoTokenizer, OwlViTConfig, OwlViTForObjectDetection, OwlViTModel

    if init_from:
        config = OwlViTConfig.from_pretrained(init_from)
        model = OwlViTForObjectDetection(config)
        encoder = OwlViTModel.from_pretrained(init_from).float()
        model.owlvit.load_state_dict(encoder.state_dict())
        tokenizer = reorder_specials(
            AutoTokenizer.from_pretrained(init_from), model.owlvit.text_model.embeddings.token_embedding
        )
        model.config.text_config.update(special_ids(tokenizer))
        return model, tokenizer
    sizes = model_sizes or EncoderConfig()
    tokenizer = build_tokenizer(sizes.max_length, n_scenes=sizes.tokenizer_scenes)
    return OwlViTForObjectDetection(owlvit_config(sizes, tokenizer)), tokenizer


def detector_outputs(
    model: Any,
    pixels: torch.Tensor,
    tokens: dict[str, torch.Tensor],
    index: torch.Tensor,
    valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, P, Q), boxes (B, P, 4)) of OwlViTForObjectDetection.forward, with each distinct phrase of the
    batch through the text tower once (`index` picks each image's queries, `valid` masks padding queries)."""
    feature_map = model.image_embedder(pixel_values=pixels)[0]
    b, h, w, d = feature_map.shape
    image_feats = feature_map.reshape(b, h * w, d)
    text = model.owlvit.get_text_features(
        input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
    )
    text = getattr(text, "pooler_output", text)
    logits, _ = model.class_predictor(image_feats, text[index], valid)
    return logits, model.box_predictor(image_feats, feature_map)


def reinit_heads(model: Any, prior_logit: float, init_scale: float) -> None:
    """Small random head weights; boxes start at the grid prior, scores at sigmoid(prior_logit).

    OWL-ViT's `_init_weights` draws head weights with std `initializer_factor` (1.0), which makes logits of
    +-100 at the start; the heads are re-drawn with PyTorch's default Linear init instead."""
    with torch.no_grad():
        for head in (model.class_head, model.box_head):
            for module in head.modules():
                if isinstance(module, torch.nn.Linear):
                    module.reset_parameters()
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.zero_()
        for name in ("logit_shift", "logit_scale"):
            getattr(model.class_head, name).weight.mul_(0.01)
        # logits = (cos + shift) * (elu(s) + 1): scale init_scale, shift prior_logit / init_scale
        model.class_head.logit_scale.bias.fill_(init_scale - 1)
        model.class_head.logit_shift.bias.fill_(prior_logit / init_scale)


class DetectorStage:
    """OwlViTForObjectDetection trained on world boxes and phrases with Hungarian matching."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        if config.continue_from:
            from transformers import OwlViTForObjectDetection

            self.model, self.tokenizer = load_trained(OwlViTForObjectDetection, config.continue_from)
        else:
            self.model, self.tokenizer = load_detector_init(config.init_from, config.model)
            self.model.float()
            reinit_heads(self.model, config.prior_logit, config.init_logit_scale)
        if config.image_size:
            self.model = resize_vision(self.model, config.image_size)
        vision = self.model.config.vision_config
        self.data = WorldScenes(
            "train",
            length=10**8,
            offset=10**7 + config.scene_offset,
            image_size=vision.image_size,
            p_lowres=config.p_lowres,
            world=WorldConfig().with_composed(config.p_composed).with_share("scattered", config.p_scattered),
        )
        unknown = set(config.focus) - set(CATEGORIES)
        if unknown or (config.p_focus > 0 and not config.focus):
            raise ValueError(f"focus must name world categories when p_focus > 0; unknown: {sorted(unknown)}")
        self.generated = None
        if config.p_generated > 0:
            if not config.generated:
                raise ValueError("p_generated > 0 needs `generated`: a folder from finetune/generated_set.py")
            self.generated = GeneratedScenes(config.generated, image_size=vision.image_size)

    def items(self, step: int) -> list[tuple[dict[str, Any], bool]]:
        """The batch's images with whether their colours are the scene's (False: a generated sample)."""
        c = self.config
        pick = random.Random(c.seed * 7_000_003 + step)
        items = []
        for i in range(c.batch_size):
            if self.generated is not None and pick.random() < c.p_generated:
                items.append((self.generated[pick.randrange(len(self.generated))], False))
            elif c.p_focus > 0 and pick.random() < c.p_focus:
                items.append((self.data[self._focus_index(pick.randrange(len(self.data)))], True))
            else:
                items.append((self.data[step * c.batch_size + i], True))
        return items

    def _focus_index(self, start: int) -> int:
        """The first training scene from `start` on that holds a focus category (the scene, not drawn)."""
        for i in range(start, start + 1000):
            i %= len(self.data)
            counts = sample_scene(scene_seed(self.data.split, self.data.offset + i), self.data.world).counts()
            if any(counts.get(category) for category in self.config.focus):
                return i
        raise ValueError(f"no training scene holds any of {self.config.focus} in 1000 tries")

    def batch(self, step: int) -> dict[str, Any]:
        """Images, the batch's distinct phrases (tokenised once) and per-image query indices and targets."""
        c = self.config
        rng = random.Random(c.seed * 1_000_003 + step)
        items = self.items(step)
        targets = [
            detection_target(
                it["ann"],
                rng,
                c.max_colour,
                c.max_referring,
                c.negatives,
                colours_known=known,
                hard_negatives=c.hard_negatives,
                all_negatives=c.all_negatives,
            )
            for it, known in items
        ]
        unique = sorted({p for t in targets for p in t.phrases})
        where = {p: i for i, p in enumerate(unique)}
        n_queries = max(len(t.phrases) for t in targets)
        index = torch.zeros((len(items), n_queries), dtype=torch.long)
        valid = torch.zeros((len(items), n_queries), dtype=torch.bool)
        for b, t in enumerate(targets):
            index[b, : len(t.phrases)] = torch.tensor([where[p] for p in t.phrases])
            valid[b, : len(t.phrases)] = True
        tokens = self.tokenizer(unique, padding=True, truncation=True, return_tensors="pt")
        return {
            "pixels": torch.stack([it["pixels"] for it, _ in items]),
            "tokens": tokens,
            "index": index,
            "valid": valid,
            "targets": targets,
        }

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Focal class loss on all patches x queries + L1/GIoU on Hungarian-matched patches."""
        c = self.config
        logits, boxes = detector_outputs(
            self.model, batch["pixels"], batch["tokens"], batch["index"], batch["valid"]
        )
        logits, boxes = logits.float(), boxes.float()
        n_objects = max(1, sum(len(t.boxes) for t in batch["targets"]))
        cls_loss = l1_loss = giou_loss = logits.new_zeros(())
        for b, t in enumerate(batch["targets"]):
            q = len(t.phrases)
            lg = logits[b, :, :q]
            target = torch.zeros_like(lg)
            if t.boxes:
                gt = torch.tensor(t.boxes, dtype=boxes.dtype, device=boxes.device)
                members = torch.zeros((len(t.boxes), q), device=boxes.device)
                for g, pos in enumerate(t.positives):
                    members[g, pos] = 1.0
                with torch.no_grad():
                    prob = lg.sigmoid() @ (members / members.sum(1, keepdim=True).clamp(min=1)).t()
                    cost = (
                        -c.w_class * prob
                        + c.w_l1 * torch.cdist(boxes[b], gt, p=1)
                        - c.w_giou * pairwise_giou(box_xyxy(boxes[b]), box_xyxy(gt))
                    )
                rows, cols = (i.to(boxes.device) for i in hungarian(cost))
                target[rows] = members[cols]
                matched, wanted = boxes[b, rows], gt[cols]
                l1_loss = l1_loss + (matched - wanted).abs().sum()
                giou = pairwise_giou(box_xyxy(matched), box_xyxy(wanted)).diagonal()
                giou_loss = giou_loss + (1 - giou).sum()
            cls_loss = cls_loss + focal_loss(lg, target, c.focal_alpha, c.focal_gamma)
        cls_loss, l1_loss, giou_loss = cls_loss / n_objects, l1_loss / n_objects, giou_loss / n_objects
        loss = c.w_class * cls_loss + c.w_l1 * l1_loss + c.w_giou * giou_loss
        return loss, {
            "cls": float(cls_loss.detach()),
            "l1": float(l1_loss.detach()),
            "giou": float(giou_loss.detach()),
        }

    def export(self, folder: Path) -> None:
        """fp16 OwlViTForObjectDetection + OwlViTProcessor (the tools' `inhouse` grounding format), and its
        fine-tuned vision tower as a CLIPVisionModel in `vision/` (the default controller's encoder)."""
        folder.mkdir(parents=True, exist_ok=True)
        half = fp16_copy(self.model)
        half.save_pretrained(folder)
        processor = owlvit_processor(self.tokenizer, self.model.config.vision_config.image_size)
        processor.save_pretrained(folder)
        clip_vision_from_owlvit(half.owlvit.vision_model).save_pretrained(folder / "vision")
        processor.image_processor.save_pretrained(folder / "vision")
