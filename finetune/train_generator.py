"""Stage 4: the default generator, tools/layout_diffusion.py's `LayoutDiffusion` trained on world images + layouts.

A pixel-space diffusers UNet2DModel predicts the noise of world images resized to `image_size` (64 px first),
given the rasterised layout of the scene's boxes and categories (one channel per world category plus the
instance-centre map, see layout_diffusion.py). The loss is `LayoutDiffusion.training_loss` (noise MSE at a
random DDPM timestep, seeded per step so that a resumed run draws the same noise). A run can start from a
trained generator's export (`continue_from`; its architecture and conditioning must be the recipe's) and draw
fresh scenes (`scene_offset`); `ema_decay` (train_loop) exports the weights' moving average. Export: `unet/`
(fp16), `scheduler/` and `layout.json`, the format of the tools' `inhouse` generator backend.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolvlm.finetune.train_common import fp16_copy
from toolvlm.finetune.train_loop import TrainConfig
from toolvlm.finetune.world_data import WorldScenes, layout_of
from toolvlm.world import CATEGORIES

log = logging.getLogger(__name__)


@dataclass
class GeneratorConfig(TrainConfig):
    """Layout-conditioned pixel diffusion sizes."""

    run_dir: str = "runs/generator"
    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.0
    image_size: int = 64
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    layers_per_block: int = 1
    norm_num_groups: int = 8
    centre_sigma: float = 0.25
    prediction_type: str = "epsilon"  # or "v_prediction"
    cond_dropout: float = 0.0  # share of images trained on the null layout (classifier-free guidance)
    guidance_scale: float = 1.0  # the export's default guidance when sampling (> 1 needs cond_dropout)
    sampler: str = "ddim"  # the export's default sampler: "ddim" (deterministic) or "ddpm" (ancestral)
    sample_steps: int = 25  # the export's default number of denoising steps
    # > 0: small objects' pixels weigh more in the loss (layout_diffusion.object_weights)
    object_weight: float = 0.0
    continue_from: str = ""  # a trained generator's export folder to train on (same architecture)
    scene_offset: int = 0  # where its training scenes start (a continued run can draw fresh ones)


class GeneratorStage:
    """LayoutDiffusion's UNet trained with the noise-prediction loss."""

    def __init__(self, config: GeneratorConfig) -> None:
        from toolvlm.tools.layout_diffusion import LayoutDiffusion, LayoutDiffusionConfig

        self.config = config
        self.layout_config = LayoutDiffusionConfig(
            categories=list(CATEGORIES),
            image_size=config.image_size,
            block_out_channels=list(config.block_out_channels),
            layers_per_block=config.layers_per_block,
            norm_num_groups=config.norm_num_groups,
            centre_sigma=config.centre_sigma,
            prediction_type=config.prediction_type,
            guidance_scale=config.guidance_scale,
            sampler=config.sampler,
            sample_steps=config.sample_steps,
        )
        if config.continue_from:
            self.pipe = self.continued(config.continue_from)
        else:
            self.pipe = LayoutDiffusion.build(self.layout_config)
        self.model = self.pipe.unet
        self.data = WorldScenes(
            "train",
            length=10**8,
            offset=3 * 10**7 + config.scene_offset,
            image_size=config.image_size,
            normalise=False,
        )

    def continued(self, folder: str) -> Any:
        """The export in `folder` in float32, after checking it is the recipe's model (its layout.json)."""
        from toolvlm.tools.layout_diffusion import LayoutDiffusion

        trained = LayoutDiffusion.from_pretrained(folder)
        if not self.layout_config.same_model(trained.config):
            raise ValueError(
                f"{folder} holds another generator than the recipe's: {trained.config} != {self.layout_config}"
            )
        trained.unet.float()
        trained.config = self.layout_config
        return trained

    def batch(self, step: int) -> dict[str, Any]:
        """Images in [-1, 1] at image_size, their layout conditioning, and the step's noise generator."""
        from toolvlm.tools.layout_diffusion import object_weights, rasterize

        c = self.config
        items = [self.data[step * c.batch_size + i] for i in range(c.batch_size)]
        layouts = [layout_of(it["ann"]) for it in items]
        cond = np.stack([rasterize(layout, self.layout_config) * 2 - 1 for layout in layouts])
        generator = torch.Generator().manual_seed(c.seed * 1_000_003 + step)
        weights = None
        if c.object_weight > 0:
            weights = torch.from_numpy(
                np.stack([object_weights(layout, self.layout_config, c.object_weight) for layout in layouts])
            )
        return {
            "pixels": torch.stack([it["pixels"] for it in items]),
            "cond": torch.from_numpy(cond),
            "generator": generator,
            "weights": weights,
        }

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Noise (or velocity) prediction MSE."""
        loss = self.pipe.training_loss(
            batch["pixels"], batch["cond"], batch["generator"], self.config.cond_dropout, batch["weights"]
        )
        return loss, {}

    def export(self, folder: Path) -> None:
        """unet/ (fp16), scheduler/, layout.json."""
        from toolvlm.tools.layout_diffusion import LayoutDiffusion

        LayoutDiffusion(fp16_copy(self.model), self.pipe.scheduler, self.layout_config).save_pretrained(
            folder
        )
