"""The `captioner` tool: an image, or a region of it, -> a caption (one sentence or a paragraph).

Backends: `blip` (BlipForConditionalGeneration), `blip2` (Blip2ForConditionalGeneration) and `inhouse`, the
project's default: a small BLIP-architecture checkpoint loaded from any local folder holding one. All load with
AutoProcessor from a local folder and decode greedily, so captions are deterministic.

A paragraph is the caption of the whole image followed by captions of its four quadrants (left/right,
top/bottom), duplicates dropped: small captioners write one short sentence, and describing the parts is what
makes a paragraph informative. A region is cropped (with a small margin) before captioning.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from PIL import Image

from toolvlm.tools import hf, imaging
from toolvlm.tools.base import Tool, ToolOutput
from toolvlm.tools.detectors import make_detector
from toolvlm.tools.draw import BOX_SCHEMA
from toolvlm.tools.grounded_caption import GroundedCaptioner
from toolvlm.tools.grounding import IMAGE_PARAM, GroundingTool

log = logging.getLogger(__name__)

GROUNDED = "grounded"  # the backend that writes captions from a detector's findings
QUADRANTS = [
    ("top left", (0, 0, 0.5, 0.5)),
    ("top right", (0.5, 0, 1, 0.5)),
    ("bottom left", (0, 0.5, 0.5, 1)),
]
QUADRANTS.append(("bottom right", (0.5, 0.5, 1, 1)))


class Captioner:
    """A BLIP-family captioning model loaded lazily from a local folder."""

    model_types = {"blip": ("blip",), "blip2": ("blip-2",), "inhouse": ("blip",)}

    def __init__(
        self,
        backend: str,
        model: str | None,
        device: str = "cpu",
        dtype: str = "float32",
        max_new_tokens: int = 30,
    ) -> None:
        if backend not in self.model_types:
            raise hf.unknown_backend("captioner", backend, list(self.model_types))
        self.backend = backend
        self.model_path = model
        self.device = device
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        self.model: Any = None
        self.processor: Any = None

    def load(self) -> None:
        """Load the model and processor (once)."""
        if self.model is not None:
            return
        folder = hf.model_folder("captioner", self.backend, self.model_path, hub_ok=self.backend != "inhouse")
        with hf.loading("captioner", self.backend, folder):
            self._load(folder)

    def _load(self, folder: Path | str) -> None:
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder)
        if config.model_type not in self.model_types[self.backend]:
            raise ValueError(
                f"captioner backend {self.backend!r} expects a {self.model_types[self.backend][0]} checkpoint, "
                f"but {folder} holds model_type {config.model_type!r}"
            )
        cls = (
            transformers.Blip2ForConditionalGeneration
            if config.model_type == "blip-2"
            else transformers.BlipForConditionalGeneration
        )
        self.processor = transformers.AutoProcessor.from_pretrained(folder)
        self.model = hf.place(cls.from_pretrained(folder, use_safetensors=True), self.device, self.dtype)

    def caption(self, image: Image.Image, max_new_tokens: int | None = None) -> str:
        """One caption, greedy decoding."""
        import torch

        inputs = self.processor(images=image, return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        inputs = inputs.to(self.device)
        with torch.inference_mode():
            ids = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens or self.max_new_tokens, do_sample=False
            )
        text = self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
        return join_pieces(text) if self.backend == "inhouse" else text


# The in-house models' world tokenizer splits text into words, single digits and punctuation and keeps no
# spaces (as CLIP's does), so decoding puts a space between every piece: "about 3 0 people , a dog 's ball ."
_DIGITS = re.compile(r"(?<=\d) (?=\d)")
_ATTACHED = re.compile(r" (?=[.,;:!?]|'(?:s|t|re|ve|m|ll|d)\b)")


def join_pieces(text: str) -> str:
    """A decoded world-tokenizer text with its pieces joined: digits into numbers, punctuation and clitics onto
    the word before ("about 30 people, a dog's ball.")."""
    return _ATTACHED.sub("", _DIGITS.sub("", text))


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    if not text:
        return ""
    return text[0].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


class CaptionerTool(Tool):
    """Describe an image or a region of it."""

    name = "captioner"
    description = (
        "Describe an image, or the region given by a box [x0, y0, x1, y1] in pixels, in one sentence "
        "(style 'sentence') or a paragraph (style 'paragraph')."
    )
    inputs = {
        "type": "object",
        "properties": {
            "image": {**IMAGE_PARAM, "description": "the image to describe (a handle such as img_0)"},
            "box": {
                **BOX_SCHEMA,
                "description": "a region [x0, y0, x1, y1] in pixels to describe instead of the whole image",
            },
            "style": {
                "enum": ["sentence", "paragraph"],
                "description": "'sentence' (default) or 'paragraph'",
            },
        },
        "required": ["image"],
    }

    def __init__(
        self,
        backend: str = "inhouse",
        model: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        max_new_tokens: int = 30,
        max_side: int = 2048,
        grounding: GroundingTool | None = None,
        vocabulary: list[str] | None = None,
    ) -> None:
        super().__init__(device=device, dtype=dtype)
        self.backend = backend
        self.captioner: Captioner | GroundedCaptioner
        if backend == GROUNDED:  # captions written from a detector's findings (tools/grounded_caption.py)
            detector = (
                grounding.detector
                if grounding is not None and model is None
                else make_detector(self.name, "inhouse", model=model, device=device, dtype=dtype)
            )
            self.captioner = GroundedCaptioner(detector, vocabulary or [])
        elif vocabulary is not None:
            raise ValueError(f"captioner: 'vocabulary' is an option of the {GROUNDED!r} backend only")
        else:
            self.captioner = Captioner(backend, model, device, dtype, max_new_tokens)
        self.max_side = max_side

    def setup(self) -> None:
        """Load the captioning model."""
        self.captioner.load()

    def forward(
        self, image: Image.Image, box: list[float] | None = None, style: str | None = None
    ) -> ToolOutput:
        """Caption the image or the region."""
        style = style or "sentence"
        artifact: dict[str, Any] = {"style": style, "image_size": [image.width, image.height]}
        note = ""
        if box is not None:
            region, clipped = imaging.check_box(box, image.width, image.height)
            margin = 0.05 * max(region[2] - region[0], region[3] - region[1])
            crop_box = imaging.clip_box(
                [region[0] - margin, region[1] - margin, region[2] + margin, region[3] + margin],
                image.width,
                image.height,
            )
            image = image.crop(tuple(round(c) for c in crop_box))
            artifact["box"] = imaging.round_box(region)
            note = " (box clipped to the image)" if clipped else ""
        image, _ = imaging.fit_image(image, self.max_side)
        main = _sentence(self.captioner.caption(image))
        if style == "paragraph":
            sentences, seen = [main] if main else [], {main.lower()}
            for where, (a, b, c, d) in QUADRANTS:
                w, h = image.size
                part = image.crop((round(a * w), round(b * h), max(round(c * w), 1), max(round(d * h), 1)))
                text = _sentence(self.captioner.caption(part))
                if text and text.lower() not in seen:
                    seen.add(text.lower())
                    sentences.append(f"In the {where}: {text[0].lower()}{text[1:]}")
            caption = " ".join(sentences)
        else:
            caption = main
        artifact["caption"] = caption
        if not caption:
            return ToolOutput(
                content=f"the captioner produced no text for this image{note}", artifact=artifact
            )
        return ToolOutput(content=caption + note, artifact=artifact)
