"""The in-house generator as a diffusers pipeline, self-contained so that it ships with the checkpoint.

This file imports only numpy, torch, PIL and diffusers, never toolvlm: the generator's export copies it into the
checkpoint folder as `pipeline.py`, and `model_index.json` names it (`"_class_name": ["pipeline",
"LayoutDiffusionPipeline"]`), so plain diffusers loads the folder:

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    image = pipe("3 dogs and a tree", seed=0).images[0]            # or boxes= and labels= for a layout

It holds what both that pipeline and toolvlm's `layout_diffusion.py` run: the layout rasterisation, the phrase
to category rule and the denoising loop (see `layout_diffusion.py` for the model and its conditioning). A
prompt is read for categories and digit counts ("3 dogs and a tree"); toolvlm's generator tool also reads
number words and places boxes by each category's usual size and place (`tools/layout.py`), while this
pipeline places a prompt's objects on a seeded grid.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from PIL import Image

SAMPLERS = ("ddim", "ddpm")
IRREGULAR_PLURALS = {"people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse"}


def check_sampler(name: str) -> str:
    """`name` when it is a known sampler; else a ValueError listing them."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, not {name!r}")
    return name


def find_category(phrase: str, categories: list[str]) -> str | None:
    """The category a phrase names ('people' -> 'person', 'the dogs' -> 'dog'), or None."""
    words = [w for w in phrase.lower().strip().split() if w not in ("a", "an", "the", "some")]
    text = " ".join(words)
    for candidate in (
        text,
        IRREGULAR_PLURALS.get(text, text),
        text.removesuffix("es"),
        text.removesuffix("s"),
    ):
        if candidate in categories:
            return candidate
    return None


def counts_in_text(text: str, categories: list[str]) -> dict[str, int]:
    """Categories named in a text with the digit count before each ('3 dogs and a tree' -> {dog: 3, tree: 1})."""
    words = text.replace(",", " ").replace(".", " ").split()
    counts: dict[str, int] = {}
    for i, word in enumerate(words):
        category = find_category(word, categories)
        if category is None:
            continue
        before = words[i - 1] if i else ""
        n = int(before) if before.isdigit() else 1  # 'a dog', 'the tree', 'dogs': one
        counts[category] = counts.get(category, 0) + n
    return counts


def rasterize_boxes(
    boxes: list[list[float]],
    labels: list[str],
    size: int,
    categories: list[str],
    centre_sigma: float,
) -> np.ndarray:
    """The (K + 1, size, size) float32 conditioning in [0, 1] of boxes given on the size x size canvas: one box
    mask per category and the instance-centre map (layout_diffusion.py)."""
    out = np.zeros((len(categories) + 1, size, size), dtype=np.float32)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for box, label in zip(boxes, labels, strict=True):
        k = categories.index(label)
        x0, y0, x1, y1 = (int(round(c)) for c in box)
        x0, y0 = max(0, min(x0, size - 1)), max(0, min(y0, size - 1))
        x1, y1 = max(x0 + 1, min(x1, size)), max(y0 + 1, min(y1, size))
        out[k, y0:y1, x0:x1] = 1.0
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        sigma = max(0.5, centre_sigma * min(box[2] - box[0], box[3] - box[1]))
        out[-1] += np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))
    np.clip(out[-1], 0, 1, out=out[-1])
    return out


def denoise(
    unet: Any,
    scheduler_config: Any,
    conditioning: torch.Tensor,
    generators: list[torch.Generator],
    steps: int,
    guidance_scale: float,
    sampler: str,
    progress: Any = None,
) -> list[Image.Image]:
    """Sample one image per conditioning row ((B, C, S, S) in [-1, 1]) from seeded noise: `sampler` "ddim"
    (eta 0) or "ddpm" (ancestral, noise from each image's generator), classifier-free guidance when w != 1;
    `progress` wraps the timesteps (a progress bar)."""
    if check_sampler(sampler) == "ddim":
        scheduler = DDIMScheduler.from_config(scheduler_config, clip_sample=True, set_alpha_to_one=True)
        options: dict[str, Any] = {"eta": 0.0}
    else:
        scheduler = DDPMScheduler.from_config(scheduler_config, clip_sample=True)
        options = {"generator": generators}
    scheduler.set_timesteps(max(1, steps))
    param = next(unet.parameters())
    size = conditioning.shape[-1]
    noise = [torch.randn((1, 3, size, size), generator=g) for g in generators]
    x = torch.cat(noise).to(param.device, param.dtype)
    cond = conditioning.to(param.device, param.dtype)
    if guidance_scale != 1:
        cond = torch.cat([cond, torch.zeros_like(cond)])  # the null conditioning: no layout at all
    timesteps = progress(scheduler.timesteps) if progress else scheduler.timesteps
    with torch.inference_mode():
        for t in timesteps:
            if guidance_scale == 1:
                output = unet(torch.cat([x, cond], dim=1), t).sample
            else:
                both = unet(torch.cat([torch.cat([x, x]), cond], dim=1), t).sample
                conditioned, null = both.chunk(2)
                output = null + guidance_scale * (conditioned - null)
            x = scheduler.step(output, t, x, **options).prev_sample
    arrays = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in arrays]


def grid_boxes(counts: dict[str, int], size: int, seed: int) -> tuple[list[list[float]], list[str]]:
    """Boxes for a prompt's objects: one cell each of a square grid over the canvas, cells in seeded order."""
    labels = [label for label, n in counts.items() for _ in range(n)]
    side = max(1, math.ceil(math.sqrt(len(labels))))
    cell = size / side
    cells = list(range(side * side))
    random.Random(seed).shuffle(cells)
    boxes = [
        [(c % side) * cell, (c // side) * cell, (c % side + 1) * cell, (c // side + 1) * cell] for c in cells
    ]
    return boxes[: len(labels)], labels


class LayoutDiffusionPipeline(DiffusionPipeline):
    """Layout-to-image (boxes and labels) or prompt-to-image with toolvlm's in-house layout UNet."""

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, layout: dict | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(layout=layout or {})

    @property
    def categories(self) -> list[str]:
        """The categories the model draws."""
        return list(self.config.layout["categories"])

    def __call__(
        self,
        prompt: str | None = None,
        boxes: list[list[float]] | None = None,
        labels: list[str] | None = None,
        seed: int = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        output_type: str = "pil",
    ) -> ImagePipelineOutput:
        """One image: of `boxes` with `labels` (pixels of the model's square canvas) when given, else of the
        objects a `prompt` names; seeded and deterministic."""
        layout = self.config.layout
        size = layout["image_size"]
        if boxes is None:
            if not prompt:
                raise ValueError("give a prompt, or boxes with labels")
            counts = counts_in_text(prompt, self.categories)
            if not counts:
                raise ValueError(f"the prompt names none of the categories: {', '.join(self.categories)}")
            boxes, labels = grid_boxes(counts, size, seed)
        named = [find_category(label, self.categories) for label in labels or []]
        if len(named) != len(boxes) or None in named:
            raise ValueError(f"give one label per box, each one of: {', '.join(self.categories)}")
        conditioning = rasterize_boxes(boxes, named, size, self.categories, layout["centre_sigma"]) * 2 - 1
        images = denoise(
            self.unet,
            self.scheduler.config,
            torch.from_numpy(conditioning)[None],
            [torch.Generator().manual_seed(seed)],
            num_inference_steps or layout["sample_steps"],
            layout["guidance_scale"] if guidance_scale is None else guidance_scale,
            sampler or layout["sampler"],
            progress=self.progress_bar,
        )
        if output_type == "np":
            return ImagePipelineOutput(images=np.stack([np.asarray(i) for i in images]))
        return ImagePipelineOutput(images=images)
