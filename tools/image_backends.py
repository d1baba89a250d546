"""Image generation backends for the generator tool, through diffusers, behind one interface.

- `sd`: any text-to-image checkpoint folder that `AutoPipelineForText2Image` loads (Stable Diffusion 1.x/2.x,
  SDXL, SD-Turbo/SDXL-Turbo). It cannot take a layout: a layout becomes a prompt naming the counts.
- `gligen`: `StableDiffusionGLIGENPipeline` (grounded generation from boxes + phrases; at most 30 boxes).
- `inhouse`: the project's layout-conditioned pixel-space UNet (layout_diffusion.py).

Every backend is seeded through a CPU `torch.Generator`, so the same seed, steps and inputs give the same image.
A layout handed to a backend is already in pixels of the requested output size.
"""

from __future__ import annotations

import logging
from typing import Any

from PIL import Image

from toolvlm.tools import hf
from toolvlm.tools.layout import Layout, layout_prompt

log = logging.getLogger(__name__)

GLIGEN_MAX_BOXES = 30
# diffusers pipelines' guidance and steps when the profile gives none (the in-house model uses its layout.json's)
DEFAULT_GUIDANCE = 7.5
DEFAULT_STEPS = 25


class ImageBackend:
    """Base class: a lazily loaded generator."""

    backend = ""
    supports_layout = False
    size_multiple = 8

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
    ) -> None:
        self.model_path = model
        self.device = device
        self.dtype = dtype
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.pipe: Any = None

    def load(self) -> None:
        """Load the weights (once)."""
        if self.pipe is None:
            where = hf.model_folder(
                "generator", self.backend, self.model_path, hub_ok=self.backend != "inhouse"
            )
            with hf.loading("generator", self.backend, where):
                self._load(where)

    def _load(self, folder: Any) -> None:
        raise NotImplementedError

    def default_size(self) -> tuple[int, int]:
        """(width, height) the model was trained at."""
        unet = self.pipe.unet
        side = unet.config.sample_size * getattr(self.pipe, "vae_scale_factor", 8)
        return int(side), int(side)

    def default_steps(self) -> int:
        """Denoising steps when neither the call nor the profile gives any."""
        return DEFAULT_STEPS

    def canonical(self, label: str) -> str:
        """The label as the backend names it (identity except for the in-house model)."""
        return label

    def known_labels(self) -> list[str]:
        """Every label the backend can draw, when it has a closed list (the in-house model); else none."""
        return []

    def _generator(self, seed: int) -> Any:
        import torch

        return torch.Generator(device="cpu").manual_seed(seed)

    def _common(self, seed: int, steps: int, width: int, height: int) -> dict[str, Any]:
        return {
            "num_inference_steps": steps,
            "width": width,
            "height": height,
            "generator": self._generator(seed),
            "guidance_scale": DEFAULT_GUIDANCE if self.guidance_scale is None else self.guidance_scale,
            "negative_prompt": self.negative_prompt,
            "output_type": "pil",
        }

    def text(self, prompt: str, seed: int, steps: int, width: int, height: int) -> Image.Image:
        """Text-to-image."""
        return self.pipe(prompt=prompt, **self._common(seed, steps, width, height)).images[0]

    def layout(self, prompt: str | None, layout: Layout, seed: int, steps: int) -> Image.Image:
        """Layout-to-image; without layout support the layout becomes a prompt."""
        text = layout_prompt(layout.counts(), prompt)
        return self.text(text, seed, steps, layout.width, layout.height)


class DiffusersText2Image(ImageBackend):
    """Any AutoPipelineForText2Image checkpoint (SD 1.x/2.x, SDXL, Turbo)."""

    backend = "sd"

    def _load(self, folder: Any) -> None:
        from diffusers import AutoPipelineForText2Image

        pipe = AutoPipelineForText2Image.from_pretrained(folder, dtype=hf.torch_dtype(self.dtype))
        pipe.set_progress_bar_config(disable=None, leave=False)  # shown on a terminal only
        self.pipe = pipe.to(self.device)


class GligenBackend(ImageBackend):
    """StableDiffusionGLIGENPipeline: boxes (normalised) + one phrase per box."""

    backend = "gligen"
    supports_layout = True

    def _load(self, folder: Any) -> None:
        from diffusers import StableDiffusionGLIGENPipeline

        pipe = StableDiffusionGLIGENPipeline.from_pretrained(folder, dtype=hf.torch_dtype(self.dtype))
        pipe.set_progress_bar_config(disable=None, leave=False)  # shown on a terminal only
        self.pipe = pipe.to(self.device)

    def text(self, prompt: str, seed: int, steps: int, width: int, height: int) -> Image.Image:
        """Text-to-image: grounding is switched off from the first step (sampling beta 0)."""
        return self.pipe(
            prompt=prompt,
            gligen_phrases=[prompt],  # the pipeline needs one phrase; unused with beta 0
            gligen_boxes=[[0.0, 0.0, 1.0, 1.0]],
            gligen_scheduled_sampling_beta=0.0,
            **self._common(seed, steps, width, height),
        ).images[0]

    def layout(self, prompt: str | None, layout: Layout, seed: int, steps: int) -> Image.Image:
        """Grounded generation; boxes beyond GLIGEN's 30 are dropped (largest kept)."""
        if not layout.boxes:
            return self.text(prompt or "a photo", seed, steps, layout.width, layout.height)
        order = sorted(range(len(layout.boxes)), key=lambda i: -(layout.boxes[i][2] - layout.boxes[i][0]))
        order = order[:GLIGEN_MAX_BOXES]
        if len(layout.boxes) > GLIGEN_MAX_BOXES:
            log.warning("GLIGEN takes at most %d boxes; %d dropped", GLIGEN_MAX_BOXES, len(layout.boxes) - 30)
        w, h = layout.width, layout.height
        boxes = [[b[0] / w, b[1] / h, b[2] / w, b[3] / h] for b in (layout.boxes[i] for i in order)]
        phrases = [layout.labels[i] for i in order]
        return self.pipe(
            prompt=prompt or layout_prompt(layout.counts()),
            gligen_phrases=phrases,
            gligen_boxes=boxes,
            gligen_scheduled_sampling_beta=0.3,
            **self._common(seed, steps, w, h),
        ).images[0]


class InhouseBackend(ImageBackend):
    """The layout-conditioned pixel UNet; text is read for category counts ('3 people and a tree')."""

    backend = "inhouse"
    supports_layout = True
    size_multiple = 1

    def _load(self, folder: Any) -> None:
        from toolvlm.tools.layout_diffusion import LayoutDiffusion

        self.pipe = LayoutDiffusion.from_pretrained(folder, self.device, self.dtype)

    def default_size(self) -> tuple[int, int]:
        """The model's square resolution."""
        side = self.pipe.config.image_size
        return side, side

    def default_steps(self) -> int:
        """The model's own default (layout.json's sample_steps)."""
        self.load()
        return self.pipe.config.sample_steps

    def canonical(self, label: str) -> str:
        """The category a phrase names."""
        return self.pipe.category_of(label)

    def known_labels(self) -> list[str]:
        """The model's categories."""
        self.load()
        return list(self.pipe.config.categories)

    def text(self, prompt: str, seed: int, steps: int, width: int, height: int) -> Image.Image:
        """A random layout of the categories the prompt names, then layout-to-image."""
        from toolvlm.tools.layout_diffusion import counts_in_prompt, default_boxes_for

        counts = counts_in_prompt(prompt, self.pipe)
        layout = default_boxes_for(counts, self.pipe.config.image_size, seed).scaled(width, height)
        return self.layout(prompt, layout, seed, steps)

    def layout(self, prompt: str | None, layout: Layout, seed: int, steps: int) -> Image.Image:
        """Render the layout and resize to the requested size."""
        labels = [self.canonical(label) for label in layout.labels]
        canvas = Layout(layout.width, layout.height, layout.boxes, labels)
        image = self.pipe.generate(canvas, seed, steps, guidance_scale=self.guidance_scale)
        if image.size != (layout.width, layout.height):
            image = image.resize((layout.width, layout.height), Image.Resampling.BICUBIC)
        return image


BACKENDS: dict[str, type[ImageBackend]] = {
    "sd": DiffusersText2Image,
    "gligen": GligenBackend,
    "inhouse": InhouseBackend,
}


def make_backend(backend: str, **options: Any) -> ImageBackend:
    """An image backend by name; raises ValueError listing the known ones."""
    if backend not in BACKENDS:
        raise hf.unknown_backend("generator", backend, list(BACKENDS))
    return BACKENDS[backend](**options)
