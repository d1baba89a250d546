"""The in-house generator: a small pixel-space diffusion model conditioned on a layout.

Model: a diffusers `UNet2DModel` on `image_size` x `image_size` RGB pixels, predicting the noise (epsilon) or
the velocity v = sqrt(a) eps - sqrt(1 - a) x0 (`prediction_type`, the scheduler's setting), with `3 + C` input
channels: the noisy image, concatenated with C layout channels, C = K + 1 for K categories.

Layout conditioning (rasterised on the model's square canvas; a layout of another size is scaled to it):
- channel k < K: 1 inside every box of category k (the union of its boxes), 0 elsewhere;
- channel K (instance centres): a Gaussian bump of peak 1 at every box's centre, sigma = `centre_sigma` times
  the box's smaller side, summed over boxes and clipped to 1, so that a crowd of overlapping instances still
  says how many there are.
Channels are mapped from [0, 1] to [-1, 1] like the pixels. An empty layout is all -1 (no objects).

Classifier-free guidance (Ho & Salimans): a model trained with `cond_dropout` (train_generator.py) also sees the
null conditioning, all channels 0 (a layout's channels are always +-1 or a centre bump, so 0 everywhere is no
layout at all, unlike the empty layout's -1); sampling then predicts u + w (c - u) from the conditioned (c) and
null (u) predictions, w = `guidance_scale` (1: no guidance, one forward per step).

Sampling: seeded Gaussian noise (a CPU `torch.Generator`, so a seed gives the same image on any device), then
`sample_steps` steps of the training DDPM schedule with `sampler`: "ddim" (eta 0, deterministic) or "ddpm"
(ancestral: every step adds fresh noise from the image's own generator, so a seed still gives one image). The
stochastic steps correct a small model's errors as they go: the bundle's generator reads back right far more
often with 100 ancestral steps than with 25 DDIM steps (README). Text is not an input: the generator tool maps
phrases to categories (`category_of`).

Checkpoint folder: `unet/` (UNet2DModel.save_pretrained), `scheduler/` (the training scheduler's config) and
`layout.json` (`LayoutDiffusionConfig` as JSON). `from_pretrained` loads any folder of this architecture.
`save_pretrained` also writes `pipeline.py` and `model_index.json`: the folder is a diffusers custom pipeline
(`layout_pipeline.py`, which shares rasterisation, category rule and denoising loop with this module).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from toolvlm.tools.base import ToolInputError
from toolvlm.tools.layout import Layout
from toolvlm.tools.layout_pipeline import (  # noqa: F401  (SAMPLERS: re-exported)
    SAMPLERS,
    check_sampler,
    counts_in_text,
    denoise,
    find_category,
    rasterize_boxes,
)
from toolvlm.tools.number_words import words_to_digits

PIPELINE_FILE = "pipeline.py"  # layout_pipeline.py as shipped in a checkpoint folder
PIPELINE_CLASS = "LayoutDiffusionPipeline"


@dataclass
class LayoutDiffusionConfig:
    """Architecture and conditioning of the in-house generator; saved as layout.json beside the weights."""

    categories: list[str] = field(default_factory=lambda: ["person", "tree"])
    image_size: int = 64
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    layers_per_block: int = 1
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    centre_sigma: float = 0.25
    prediction_type: str = "epsilon"  # or "v_prediction" (Salimans & Ho): cleaner samples from a small model
    guidance_scale: float = 1.0  # sampling's default; > 1 needs a model trained with cond_dropout
    sampler: str = "ddim"  # sampling's default: "ddim" (eta 0, deterministic) or "ddpm" (ancestral)
    sample_steps: int = 25  # sampling's default number of denoising steps
    version: int = 1

    def __post_init__(self) -> None:
        check_sampler(self.sampler)

    def same_model(self, other: LayoutDiffusionConfig) -> bool:
        """Whether `other` describes the same network and conditioning (sampling defaults aside)."""
        defaults = {
            "guidance_scale": self.guidance_scale,
            "sampler": self.sampler,
            "sample_steps": self.sample_steps,
        }
        return replace(other, **defaults) == self

    @property
    def layout_channels(self) -> int:
        """Number of conditioning channels (categories + the centre map)."""
        return len(self.categories) + 1


def rasterize(layout: Layout, config: LayoutDiffusionConfig) -> np.ndarray:
    """The (C, S, S) float32 conditioning of a layout, values in [0, 1]."""
    size = config.image_size
    canvas = layout.scaled(size, size)
    return rasterize_boxes(canvas.boxes, canvas.labels, size, config.categories, config.centre_sigma)


def object_weights(layout: Layout, config: LayoutDiffusionConfig, strength: float) -> np.ndarray:
    """The (1, S, S) per-pixel loss weights that give small objects their share of the loss: 1 + strength *
    max over the boxes covering a pixel of min(1, (S/8)^2 / box area), normalised to mean 1. A ball of a few
    pixels otherwise weighs nothing beside the sky (training only; train_generator's `object_weight`)."""
    size = config.image_size
    canvas = layout.scaled(size, size)
    boost = np.zeros((size, size), dtype=np.float32)
    reference = (size / 8) ** 2
    for box in canvas.boxes:
        x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
        x1, y1 = min(size, max(x0 + 1, int(np.ceil(box[2])))), min(size, max(y0 + 1, int(np.ceil(box[3]))))
        area = max(1.0, (box[2] - box[0]) * (box[3] - box[1]))
        np.maximum(boost[y0:y1, x0:x1], min(1.0, reference / area), out=boost[y0:y1, x0:x1])
    weights = 1 + strength * boost
    return (weights / weights.mean())[None]


class LayoutDiffusion:
    """UNet2DModel + scheduler + layout config: build, save, load, sample."""

    def __init__(self, unet: Any, scheduler: Any, config: LayoutDiffusionConfig) -> None:
        self.unet = unet
        self.scheduler = scheduler
        self.config = config

    @classmethod
    def build(cls, config: LayoutDiffusionConfig) -> LayoutDiffusion:
        """A randomly initialised model of this architecture."""
        from diffusers import DDPMScheduler, UNet2DModel

        n = len(config.block_out_channels)
        unet = UNet2DModel(
            sample_size=config.image_size,
            in_channels=3 + config.layout_channels,
            out_channels=3,
            block_out_channels=tuple(config.block_out_channels),
            layers_per_block=config.layers_per_block,
            down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
            up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
            norm_num_groups=config.norm_num_groups,
        )
        if config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type must be 'epsilon' or 'v_prediction', not {config.prediction_type!r}"
            )
        scheduler = DDPMScheduler(
            num_train_timesteps=config.num_train_timesteps,
            beta_schedule="squaredcos_cap_v2",
            prediction_type=config.prediction_type,
        )
        return cls(unet, scheduler, config)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str = "cpu", dtype: str = "float32"
    ) -> LayoutDiffusion:
        """Load a checkpoint folder (unet/, scheduler/, layout.json)."""
        from diffusers import DDPMScheduler, UNet2DModel

        from toolvlm.tools import hf

        folder = Path(folder)
        if not (folder / "layout.json").is_file():
            raise ValueError(f"{folder} is not an in-house generator checkpoint (no layout.json)")
        config = LayoutDiffusionConfig(**json.loads((folder / "layout.json").read_text()))
        unet = UNet2DModel.from_pretrained(folder / "unet", dtype=hf.torch_dtype(dtype)).to(device).eval()
        if unet.config.in_channels != 3 + config.layout_channels:
            raise ValueError(
                f"{folder}: the UNet takes {unet.config.in_channels} input channels but layout.json implies "
                f"{3 + config.layout_channels} (3 + {len(config.categories)} categories + 1)"
            )
        return cls(unet, DDPMScheduler.from_pretrained(folder / "scheduler"), config)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write unet/, scheduler/ and layout.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet")
        # diffusers records the folder a model was loaded from; a checkpoint carries no path of this machine
        unet_config = folder / "unet" / "config.json"
        config = json.loads(unet_config.read_text())
        config.pop("_name_or_path", None)
        unet_config.write_text(json.dumps(config, indent=2) + "\n")
        self.scheduler.save_pretrained(folder / "scheduler")
        (folder / "layout.json").write_text(json.dumps(asdict(self.config), indent=2))
        write_pipeline_files(folder, self.config)

    def category_of(self, phrase: str) -> str:
        """The category a phrase names ('people' -> 'person'); ToolInputError when none."""
        category = find_category(phrase, self.config.categories)
        if category is not None:
            return category
        raise ToolInputError(
            f"the in-house generator cannot draw '{phrase}'; it knows: {', '.join(self.config.categories)}"
        )

    def conditioning(self, layout: Layout) -> Any:
        """The (1, C, S, S) conditioning tensor in [-1, 1]."""
        import torch

        return torch.from_numpy(rasterize(layout, self.config) * 2 - 1)[None]

    def training_loss(
        self,
        pixels: Any,
        conditioning: Any,
        generator: Any = None,
        cond_dropout: float = 0.0,
        weights: Any = None,
    ) -> Any:
        """MSE of the predicted noise (or velocity) for a batch of images in [-1, 1] and their layouts; each
        image's layout is replaced by the null conditioning with probability `cond_dropout`; `weights` (B, 1,
        S, S), when given, weigh the pixels (`object_weights`)."""
        import torch

        noise = torch.randn(pixels.shape, generator=generator, device=pixels.device, dtype=pixels.dtype)
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (pixels.shape[0],), generator=generator, device=pixels.device)
        if cond_dropout > 0:
            keep = torch.rand(pixels.shape[0], generator=generator, device=pixels.device) >= cond_dropout
            conditioning = conditioning * keep[:, None, None, None].to(conditioning.dtype)
        noisy = self.scheduler.add_noise(pixels, noise, t)
        predicted = self.unet(torch.cat([noisy, conditioning.to(noisy.dtype)], dim=1), t).sample
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(pixels, noise, t)
        else:
            target = noise
        if weights is None:
            return torch.nn.functional.mse_loss(predicted.float(), target.float())
        return ((predicted.float() - target.float()) ** 2 * weights.float()).mean()

    def generate(
        self,
        layout: Layout,
        seed: int = 0,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
    ) -> Image.Image:
        """Sample an image of the layout (square, image_size pixels); deterministic given the seed."""
        return self.generate_many([layout], [seed], steps, guidance_scale, sampler)[0]

    def generate_many(
        self,
        layouts: list[Layout],
        seeds: list[int],
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
    ) -> list[Image.Image]:
        """Sample one image per (layout, seed) in one batch; image k is `generate(layouts[k], seeds[k])`.
        `steps`, `guidance_scale` and `sampler` default to the config's."""
        import torch

        if len(layouts) != len(seeds):
            raise ValueError(f"{len(layouts)} layouts but {len(seeds)} seeds")
        # one CPU generator per image draws its start and (ancestral sampling) every step's noise
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        cond = torch.cat([self.conditioning(layout) for layout in layouts])
        # a progress bar on a terminal (tqdm disables itself when stderr is not one); ~4 s per image here
        return denoise(
            self.unet,
            self.scheduler.config,
            cond,
            generators,
            steps or self.config.sample_steps,
            self.config.guidance_scale if guidance_scale is None else guidance_scale,
            sampler or self.config.sampler,
            progress=lambda steps: tqdm(steps, desc="diffusion", unit="step", leave=False, disable=None),
        )


def write_pipeline_files(folder: str | Path, config: LayoutDiffusionConfig) -> None:
    """Make a checkpoint folder a diffusers custom pipeline: `pipeline.py` (layout_pipeline.py, which imports no
    toolvlm) and `model_index.json` naming it, its components (unet/, scheduler/) and the layout config."""
    import diffusers

    from toolvlm.tools import layout_pipeline

    folder = Path(folder)
    shutil.copyfile(layout_pipeline.__file__, folder / PIPELINE_FILE)
    index = {
        "_class_name": [Path(PIPELINE_FILE).stem, PIPELINE_CLASS],
        "_diffusers_version": diffusers.__version__,
        "layout": asdict(config),
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def default_boxes_for(counts: dict[str, int], size: int, seed: int) -> Layout:
    """A layout with the given instances per category at free positions (for text-only requests)."""
    import random

    from toolvlm.tools.layout import place_boxes

    layout = Layout(size, size)
    rng = random.Random(seed)
    for label, n in counts.items():
        place_boxes(layout, label, n, rng)
    return layout


def counts_in_prompt(prompt: str, model: LayoutDiffusion) -> dict[str, int]:
    """Categories named in a prompt with their counts ('eight dogs and a tree' -> {'dog': 8, 'tree': 1});
    a count past count_change.MAX_COUNT is a ToolInputError."""
    from toolvlm.tools.count_change import MAX_COUNT

    counts = counts_in_text(words_to_digits(prompt), model.config.categories)
    too_many = {c: n for c, n in counts.items() if n > MAX_COUNT}
    if too_many:
        asked = ", ".join(f"{n} {c}" for c, n in too_many.items())
        raise ToolInputError(f"the prompt asks for {asked}; at most {MAX_COUNT} of one object can be drawn")
    return counts
