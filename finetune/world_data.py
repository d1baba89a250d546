"""Torch datasets over world scenes drawn on the fly from seeds, and the training targets of the world models.

A scene is identified by (split, index): training scenes use seeds `index` (below `EVAL_SEED_BASE`), held-out
scenes use `EVAL_SEED_BASE + index`, so the two never overlap and nothing is stored on disk. An item is the
rendered image as a normalised tensor plus the scene's annotation (`world.annotate`). Stage-specific targets
are built from annotations by plain functions: texts for contrastive pairs (captions and presence statements),
detection queries with per-object positives (category, colour and referring phrases), caption texts (sentence
or paragraph) and generator layouts. This module knows no models; the trainers batch what it returns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from toolvlm.world import CATEGORIES, WorldConfig, annotate, render_scene, sample_scene
from toolvlm.world.scene import PALETTES
from toolvlm.world.text import describe, plural

EVAL_SEED_BASE = 1_000_000_000
SPLITS = ("train", "eval")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def scene_seed(split: str, index: int) -> int:
    """The seed of scene `index` of a split; train and eval seed ranges are disjoint."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are: {', '.join(SPLITS)}")
    if not 0 <= index < EVAL_SEED_BASE:
        raise ValueError(f"scene index must be in [0, {EVAL_SEED_BASE}), got {index}")
    return index if split == "train" else EVAL_SEED_BASE + index


def to_pixels(
    image: Image.Image, size: int, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
) -> torch.Tensor:
    """A (3, size, size) float tensor: resized (bicubic, as the HF processors), scaled to [0, 1], normalised."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass
class WorldScenes(Dataset):
    """Scenes `offset .. offset + length - 1` of a split: {'pixels', 'image', 'ann'} per item."""

    split: str = "train"
    length: int = 1000
    offset: int = 0
    image_size: int = 224
    normalise: bool = True  # False: pixels in [-1, 1] (the generator), True: CLIP mean/std
    world: WorldConfig = field(default_factory=WorldConfig)
    p_lowres: float = 0.0  # share of images blurred like a generator's: down to `lowres` pixels and back up
    lowres: int = 64

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        seed = scene_seed(self.split, self.offset + i)
        scene = sample_scene(seed, self.world)
        image = render_scene(scene)
        if self.p_lowres > 0 and random.Random(seed).random() < self.p_lowres:
            size = image.size
            image = image.resize((self.lowres, self.lowres), Image.BICUBIC).resize(size, Image.BICUBIC)
        if self.normalise:
            pixels = to_pixels(image, self.image_size)
        else:
            pixels = to_pixels(image, self.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        return {"pixels": pixels, "image": image, "ann": annotate(scene)}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack pixels; keep images and annotations as lists."""
    return {
        "pixels": torch.stack([it["pixels"] for it in items]),
        "images": [it["image"] for it in items],
        "anns": [it["ann"] for it in items],
    }


# --- contrastive texts -------------------------------------------------------------------------------------


def presence_text(category: str, present: bool) -> str:
    """The statement 'a photo with a dog' or 'a photo with no dogs' (zero-shot presence prompts)."""
    if present:
        article = "an" if category[0] in "aeiou" else "a"
        return f"a photo with {article} {category}"
    return f"a photo with no {plural(category)}"


def presence_prompts() -> list[str]:
    """'a photo with a C' for every category, then 'a photo with no Cs' (the zero-shot presence prompts)."""
    return [presence_text(c, True) for c in CATEGORIES] + [presence_text(c, False) for c in CATEGORIES]


def present_categories(ann: dict[str, Any]) -> set[str]:
    """Categories with at least one object in the scene."""
    return {c for c, n in ann["counts"].items() if n > 0}


def contrastive_text(ann: dict[str, Any], rng: random.Random, p_caption: float) -> tuple[str, Any]:
    """A text for the image: its caption (key None), or a presence statement (key (category, present))."""
    if rng.random() < p_caption:
        return ann["caption"], None
    category = rng.choice(CATEGORIES)
    present = category in present_categories(ann)
    return presence_text(category, present), (category, present)


def text_matches(ann: dict[str, Any], key: Any, own: bool) -> bool:
    """Whether a text (by its key from `contrastive_text`) is true of a scene: captions only of their own."""
    if key is None:
        return own
    category, present = key
    return (category in present_categories(ann)) == present


# --- detection targets -------------------------------------------------------------------------------------


@dataclass
class DetectionTarget:
    """Queries of one image and its objects: boxes (cx, cy, w, h in [0, 1]) and the queries each answers."""

    phrases: list[str]
    boxes: list[list[float]]
    positives: list[list[int]]  # per object, indices into phrases
    kinds: list[str]  # per phrase: 'category', 'colour', 'referring', 'negative'


def normalised_cxcywh(box: list[float], width: int, height: int) -> list[float]:
    """[x0, y0, x1, y1] pixels -> [cx, cy, w, h] in [0, 1]."""
    x0, y0, x1, y1 = box
    return [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]


def colour_phrases() -> list[str]:
    """Every colour phrase the sampler can produce ('red frisbee', 'person in a blue shirt')."""
    return [describe(c, colour) for c, palette in PALETTES.items() for colour in palette]


def detection_target(
    ann: dict[str, Any],
    rng: random.Random,
    max_colour: int = 8,
    max_referring: int = 4,
    negatives: int = 4,
    p_plural: float = 0.2,
    colours_known: bool = True,
    hard_negatives: int = 0,
    all_negatives: bool = False,
) -> DetectionTarget:
    """Queries for one image: every present category, colour phrases, referring expressions, absent phrases.
    `hard_negatives` of the absent phrases name a present category in a colour it does not have here ('white
    house' beside a red one), the confusions random absent phrases rarely show. Without `colours_known` (an
    image whose colours are not the scene's, as a generated one) the queries are only present and absent
    categories. With `all_negatives` every absent phrase is asked, as the evaluation asks them all (a flower
    must learn it is no bird, not only the absent categories a draw happens to pick)."""
    if not colours_known:
        max_colour = max_referring = hard_negatives = 0
    objects = ann["objects"]
    phrases: list[str] = []
    kinds: list[str] = []
    positives: list[list[int]] = [[] for _ in objects]

    def add(phrase: str, kind: str, members: list[int]) -> None:
        q = len(phrases)
        phrases.append(phrase)
        kinds.append(kind)
        for i in members:
            positives[i].append(q)

    present = sorted(present_categories(ann))
    for category in present:
        word = plural(category) if rng.random() < p_plural else category
        add(word, "category", [i for i, o in enumerate(objects) if o["category"] == category])
    colours = sorted({describe(o["category"], o["color"]) for o in objects if o.get("color")})
    rng.shuffle(colours)
    for phrase in colours[:max_colour]:
        add(
            phrase,
            "colour",
            [
                i
                for i, o in enumerate(objects)
                if o.get("color") and describe(o["category"], o["color"]) == phrase
            ],
        )
    referring = list(ann["referring"])
    rng.shuffle(referring)
    for expr in referring[:max_referring]:
        if expr["text"] not in phrases:
            add(expr["text"], "referring", [expr["target"]])
    absent = [c for c in CATEGORIES if c not in present]
    absent_colours = [p for p in colour_phrases() if p not in colours]
    if all_negatives:
        pool = absent + (absent_colours if colours_known else [])
    else:
        n_colour = negatives // 2 if colours_known else 0
        pool = rng.sample(absent, min(len(absent), negatives - n_colour))
        pool += rng.sample(absent_colours, min(len(absent_colours), n_colour))
    shown = {describe(o["category"], o["color"]) for o in objects if o.get("color")}
    hard = [describe(c, colour) for c in present for colour in PALETTES.get(c, ())]
    hard = [p for p in hard if p not in shown and p not in pool]
    pool += rng.sample(hard, min(len(hard), hard_negatives))
    for phrase in pool:
        add(phrase, "negative", [])
    boxes = [normalised_cxcywh(o["box"], ann["width"], ann["height"]) for o in objects]
    return DetectionTarget(phrases, boxes, positives, kinds)


# --- captions and layouts ----------------------------------------------------------------------------------


def caption_text(ann: dict[str, Any], rng: random.Random, p_paragraph: float) -> str:
    """The training caption: the one-sentence caption, or (with probability p_paragraph) the paragraph."""
    return ann["paragraph"] if rng.random() < p_paragraph else ann["caption"]


def layout_of(ann: dict[str, Any]):
    """The scene's layout (boxes and category labels) for the generator."""
    from toolvlm.tools.layout import Layout

    return Layout(
        ann["width"],
        ann["height"],
        [list(map(float, o["box"])) for o in ann["objects"]],
        [o["category"] for o in ann["objects"]],
    )
