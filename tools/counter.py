"""The `counter` tool: how many instances of a phrase -> count, boxes and the annotated image.

It runs on a grounding backend (its own, or the grounding tool's detector when built together, see
registry.build_tools), with a score threshold, per-label NMS (optionally also dropping a box that lies mostly
inside a better one, `contain`: a dog's head found beside the dog is not a second dog) and, for crowds of
hundreds of small objects, tiling: an image larger than 1.5 tiles is cut into overlapping windows, each detected
at the detector's full resolution, and the boxes merged back with NMS. The count is always the number of boxes
returned.
"""

from __future__ import annotations

import math
from typing import Any

from PIL import Image

from toolvlm.tools import imaging
from toolvlm.tools.base import Tool, ToolOutput
from toolvlm.tools.detectors import make_detector
from toolvlm.tools.grounding import IMAGE_PARAM, MAX_PHRASE_CHARS, GroundingTool, locate, split_phrases

DEFAULT_THRESHOLD = 0.2  # without one given or shipped with the weights (detectors.CALIBRATION)


class CounterTool(Tool):
    """Count the instances of a phrase."""

    name = "counter"
    description = (
        "Count how many instances of an object (e.g. 'person') are in an image; returns the count, the boxes "
        "[x0, y0, x1, y1] in pixels and the image with the counted objects drawn. Works on crowds (tiling)."
    )
    inputs = {
        "type": "object",
        "properties": {
            "image": {**IMAGE_PARAM, "description": "the image to count in (a handle such as img_0)"},
            "phrase": {
                "type": "string",
                "maxLength": MAX_PHRASE_CHARS,
                "description": "what to count, e.g. 'person'",
            },
            "threshold": {
                "type": "number",
                "minimum": 0,
                "maximum": 1,
                "description": "minimum score of a counted box; lower counts more",
            },
            "tiling": {
                "type": "boolean",
                "description": "cut the image into overlapping tiles (default: only when the image is large)",
            },
        },
        "required": ["image", "phrase"],
    }

    def __init__(
        self,
        backend: str = "inhouse",
        model: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        threshold: float | None = None,
        nms_iou: float = 0.5,
        contain: float | None = None,
        tile_size: int = 768,
        max_side: int = 4096,
        grounding: GroundingTool | None = None,
        views: int | None = None,
    ) -> None:
        super().__init__(device=device, dtype=dtype)
        self.backend = backend
        if grounding is not None and model is None:
            self.detector = grounding.detector  # share the grounding tool's model
        else:
            self.detector = make_detector(
                self.name, backend, model=model, device=device, dtype=dtype, views=views
            )
        self.threshold = threshold
        self.nms_iou = nms_iou
        # a box this much inside a better one is taken for a part of it (1: off; None: what the weights ship,
        # `count_contain` of calibrate_detector --contain, else off)
        self.contain = contain
        self.tile_size = tile_size
        self.max_side = max_side

    def validate(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The base checks, then the phrase's (empty, wordless, too many), before any weights load."""
        arguments = super().validate(kwargs)
        split_phrases(arguments["phrase"])
        return arguments

    def setup(self) -> None:
        """Load the detector's weights."""
        self.detector.load(self.name)

    def effective_threshold(self, given: float | None = None, phrase: str | None = None) -> float:
        """The score threshold of a call: given, else the tool's, else the one the weights ship (the phrase's
        own where they ship one), else 0.2."""
        if given is not None:
            return given
        if self.threshold is not None:
            return self.threshold
        self.detector.load(self.name)
        return self.detector.threshold("count", DEFAULT_THRESHOLD, phrase)

    def effective_contain(self) -> float:
        """The containment NMS threshold: the tool's, else the one the weights ship, else 1 (off)."""
        if self.contain is not None:
            return self.contain
        self.detector.load(self.name)
        return float(self.detector.calibration.get("count_contain", 1.0))

    def forward(
        self, image: Image.Image, phrase: str, threshold: float | None = None, tiling: bool | None = None
    ) -> ToolOutput:
        """Count the phrase's instances."""
        phrases = split_phrases(phrase)
        thresholds = {p: self.effective_threshold(threshold, p) for p in phrases}
        threshold = min(thresholds.values())
        small_side = max(image.size) * min(1.0, self.max_side / max(image.size))
        if tiling is None:
            tiling = small_side > 1.5 * self.tile_size
        # forced tiling of a small image still cuts it into about 2x2 windows
        tile = min(self.tile_size, math.ceil(small_side * 0.6)) if tiling else None
        located = locate(
            self.detector,
            image,
            phrases,
            threshold,
            self.nms_iou,
            self.max_side,
            tile,
            self.effective_contain(),
        )
        located.select(
            [
                i
                for i, (s, p) in enumerate(zip(located.scores, located.labels, strict=True))
                if s >= thresholds[p]
            ]
        )
        count = len(located.boxes)
        artifact = {
            **located.artifact(image),
            "phrase": phrase,
            "threshold": threshold,
            "tiles": located.tiles,
        }
        if len(set(thresholds.values())) > 1:
            artifact["thresholds"] = thresholds
        artifact["per_label"] = {p: located.labels.count(p) for p in phrases}
        annotated = imaging.draw_boxes(image, located.boxes, located.labels)
        how = f" ({located.tiles} tiles)" if located.tiles > 1 else ""
        if len(phrases) == 1:
            content = f"about {count} instance(s) of '{phrase}' (score >= {threshold:g}){how}"
        else:
            counts = ", ".join(f"{n} {p}" for p, n in artifact["per_label"].items())
            shown = (
                ", ".join(f"{t:g} for {p}" for p, t in thresholds.items())
                if "thresholds" in artifact
                else f"{threshold:g}"
            )
            content = f"about {count} in all: {counts} (score >= {shown}){how}"
        if count == 0:
            content += "; try a lower threshold or a more general phrase"
        return ToolOutput(content=content, images=[annotated], artifact=artifact)
