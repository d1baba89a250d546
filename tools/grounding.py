"""The `grounding` tool: a phrase or referring expression -> boxes, scores, labels and the annotated image.

It owns the detection pipeline shared with the counter (`locate`): normalise the image, downscale huge images
(boxes mapped back to the image as given), optionally tile large images, run a detector backend, clip boxes to
the image, drop empty ones, and apply per-label NMS. Backends live in detectors.py; this module imports no
model code until the first call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from toolvlm.tools import imaging, referring
from toolvlm.tools.base import Tool, ToolInputError, ToolOutput
from toolvlm.tools.detectors import Detection, Detector, make_detector

log = logging.getLogger(__name__)

MIN_SIDE = 8
DEFAULT_THRESHOLD = 0.1  # without one given or shipped with the weights (detectors.CALIBRATION)
IMAGE_PARAM = {
    "type": "string",
    "format": "image",
    "description": "the image to search (a handle such as img_0)",
}


@dataclass
class Located:
    """Detections in pixels of the image as given, after clipping and NMS, best score first."""

    boxes: list[list[float]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    tiles: int = 1
    scale: float = 1.0

    def select(self, order: list[int]) -> None:
        """Keep the detections at these indices, in this order."""
        self.boxes = [self.boxes[i] for i in order]
        self.scores = [self.scores[i] for i in order]
        self.labels = [self.labels[i] for i in order]

    def sort(self) -> None:
        """Order the detections best score first."""
        self.select(sorted(range(len(self.boxes)), key=lambda i: -self.scores[i]))

    def artifact(self, image: Image.Image) -> dict[str, Any]:
        """JSON-serialisable view."""
        return {
            "boxes": [imaging.round_box(b) for b in self.boxes],
            "scores": [round(s, 4) for s in self.scores],
            "labels": list(self.labels),
            "count": len(self.boxes),
            "image_size": [image.width, image.height],
        }


# a phrase is a few words: longer text is a mistake (and every phrase is one more detector query)
MAX_PHRASE_CHARS = 500
MAX_PHRASES = 16


def split_phrases(phrase: str) -> list[str]:
    """Phrases separated by ';' (a referring expression may contain commas and 'and'), repeats dropped; rejects
    empty input and more than MAX_PHRASES phrases (each is a query of its own)."""
    phrases = list(dict.fromkeys(p.strip() for p in phrase.split(";") if p.strip()))
    if not phrases:
        raise ToolInputError(
            "the phrase is empty; give a short noun phrase such as 'person' or 'the red car'"
        )
    wordless = [p for p in phrases if not any(c.isalnum() for c in p)]
    if wordless:
        raise ToolInputError(
            f"the phrase {wordless[0]!r} has no letters; give a short noun phrase such as 'person' or 'the red car'"
        )
    if len(phrases) > MAX_PHRASES:
        raise ToolInputError(
            f"{len(phrases)} phrases separated by ';'; at most {MAX_PHRASES} in one call, split them over calls"
        )
    return phrases


def locate(
    detector: Detector,
    image: Image.Image,
    phrases: list[str],
    threshold: float,
    nms_iou: float = 0.5,
    max_side: int = 2048,
    tile_size: int | None = None,
    contain: float = 1.0,
) -> Located:
    """Detect `phrases` in `image`; boxes come back in pixels of `image` (any downscaling is undone). NMS per
    phrase at `nms_iou` (between boxes of two views of the detector, its `view_iou`), also dropping a box that
    lies `contain` or more inside a better one (1: off)."""
    if min(image.size) < MIN_SIDE:
        raise ToolInputError(
            f"the image is {image.width}x{image.height} pixels, too small to search; "
            f"give an image at least {MIN_SIDE} pixels on each side"
        )
    small, scale = imaging.fit_image(image, max_side)
    windows = (
        imaging.tiles(small.width, small.height, tile_size)
        if tile_size
        else [(0, 0, small.width, small.height)]
    )
    found: list[Detection] = []
    for x0, y0, x1, y1 in windows:
        crop = (
            small if (x0, y0, x1, y1) == (0, 0, small.width, small.height) else small.crop((x0, y0, x1, y1))
        )
        for det in detector.detect(crop, phrases, threshold):
            box = [det.box[0] + x0, det.box[1] + y0, det.box[2] + x0, det.box[3] + y0]
            found.append(Detection(box, det.score, det.label, det.view))
    result = Located(tiles=len(windows), scale=scale)
    for label in dict.fromkeys(d.label for d in found):
        group = [d for d in found if d.label == label]
        boxes = [
            imaging.clip_box(imaging.scale_boxes([d.box], 1 / scale)[0], image.width, image.height)
            for d in group
        ]
        keep = [
            i for i in range(len(group)) if boxes[i][2] - boxes[i][0] >= 1 and boxes[i][3] - boxes[i][1] >= 1
        ]
        kept = imaging.nms(
            [boxes[i] for i in keep],
            [group[i].score for i in keep],
            nms_iou,
            contain,
            [group[i].view for i in keep],
            detector.view_iou,
        )
        for k in kept:
            i = keep[k]
            result.boxes.append(boxes[i])
            result.scores.append(group[i].score)
            result.labels.append(label)
    result.sort()
    if scale != 1.0:
        log.info("image %sx%s downscaled by %.3f for detection", image.width, image.height, scale)
    return result


def describe_boxes(located: Located, limit: int = 5) -> str:
    """A short text listing the best boxes."""
    parts = [
        f"{label} [{', '.join(str(round(c)) for c in box)}] ({score:.2f})"
        for box, score, label in zip(
            located.boxes[:limit], located.scores[:limit], located.labels[:limit], strict=True
        )
    ]
    more = f" and {len(located.boxes) - limit} more" if len(located.boxes) > limit else ""
    return "; ".join(parts) + more


class GroundingTool(Tool):
    """Open-vocabulary detection of phrases and referring expressions."""

    name = "grounding"
    description = (
        "Find objects described by a phrase or referring expression (e.g. 'the tree', 'the red frisbee next to "
        "the dog') and return their bounding boxes [x0, y0, x1, y1] in pixels, scores, and the image with the "
        "boxes drawn. Separate several phrases with ';'."
    )
    inputs = {
        "type": "object",
        "properties": {
            "image": IMAGE_PARAM,
            "phrase": {
                "type": "string",
                "maxLength": MAX_PHRASE_CHARS,
                "description": "what to find, e.g. 'the tree'; several: 'dog; frisbee'",
            },
            "threshold": {
                "type": "number",
                "minimum": 0,
                "maximum": 1,
                "description": "minimum score of a box; lower finds more",
            },
            "max_boxes": {
                "type": "integer",
                "minimum": 1,
                "description": "keep at most this many boxes, best first (1 for a single referred object)",
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
        max_side: int = 2048,
        max_boxes: int = 100,
        geometry: bool = True,
        views: int | None = None,
    ) -> None:
        super().__init__(device=device, dtype=dtype)
        self.backend = backend
        self.detector = make_detector(
            self.name, backend, model=model, device=device, dtype=dtype, views=views
        )
        self.threshold = threshold
        self.nms_iou = nms_iou
        self.max_side = max_side
        self.max_boxes = max_boxes
        self.geometry = geometry  # resolve position words and landmarks (referring.py); off for a detector
        # that reads whole referring expressions itself

    def validate(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The base checks, then the phrase's (empty, wordless, too many), before any weights load."""
        arguments = super().validate(kwargs)
        split_phrases(arguments["phrase"])
        return arguments

    def setup(self) -> None:
        """Load the detector's weights."""
        self.detector.load(self.name)

    def find(self, image: Image.Image, phrases: list[str], threshold: float) -> tuple[Located, list[dict]]:
        """Each phrase's boxes, best first; a phrase with position words or a landmark gets the one box they name
        among the detections of its parts (referring.py), described in the second value."""
        refs = [referring.parse(p) if self.geometry else referring.Referring(p, p) for p in phrases]
        queries = list(dict.fromkeys(q for ref in refs for q in ref.queries))
        # a detector that gives each box to one phrase of a call searches a phrase's parts one call each
        alone = not self.detector.independent_phrases and any(ref.composed for ref in refs)
        batches = [[q] for q in queries] if alone else [queries]
        found: dict[str, referring.Found] = {q: ([], []) for q in queries}
        result = Located()
        for batch in batches:
            located = locate(self.detector, image, batch, threshold, self.nms_iou, self.max_side)
            result.tiles, result.scale = located.tiles, located.scale
            for box, score, label in zip(located.boxes, located.scores, located.labels, strict=True):
                found[label][0].append(box)
                found[label][1].append(score)
        resolved = []
        for ref in dict.fromkeys(refs):
            picked = referring.resolve(ref, found)
            boxes, scores = picked if picked is not None else found[ref.phrase]
            result.boxes += boxes
            result.scores += scores
            result.labels += [ref.phrase] * len(boxes)
            if ref.composed:
                parts = {"position": ref.position, "relation": ref.relation, "landmark": ref.landmark}
                resolved.append(
                    {
                        "phrase": ref.phrase,
                        "search": ref.search,
                        **{k: v for k, v in parts.items() if v},
                        "by": "whole phrase" if picked is None else "geometry",
                        "candidates": len(found[ref.search][0]),
                    }
                )
        result.sort()
        return result, resolved

    def forward(
        self, image: Image.Image, phrase: str, threshold: float | None = None, max_boxes: int | None = None
    ) -> ToolOutput:
        """Detect the phrase(s), resolve position words and landmarks by geometry, and draw the boxes."""
        phrases = split_phrases(phrase)
        if threshold is None:
            threshold = self.threshold
        if threshold is None:
            self.detector.load(self.name)
            threshold = self.detector.threshold("grounding", DEFAULT_THRESHOLD)
        located, resolved = self.find(image, phrases, threshold)
        located.select(list(range(min(len(located.boxes), max_boxes or self.max_boxes))))
        artifact = {**located.artifact(image), "phrase": phrase, "threshold": threshold}
        if resolved:
            artifact["resolved"] = resolved
        if not located.boxes:
            content = (
                f"no box for '{phrase}' above threshold {threshold:g} in the {image.width}x{image.height} image; "
                "try a lower threshold or a more general phrase"
            )
            return ToolOutput(content=content, images=[], artifact=artifact)
        annotated = imaging.draw_boxes(image, located.boxes, located.labels, located.scores)
        content = (
            f"found {len(located.boxes)} box(es) for '{phrase}' in the {image.width}x{image.height} image: "
            f"{describe_boxes(located)}"
        )
        return ToolOutput(content=content, images=[annotated], artifact=artifact)
