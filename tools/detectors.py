"""Open-vocabulary detection backends behind one interface: `Detector.detect(image, phrases, threshold)`.

Backends (keyed by name in `DETECTORS`): `owlv2`, `owlvit`, `grounding_dino` (transformers checkpoints in a
local folder) and `inhouse`, the project's default: an OWL-ViT-architecture checkpoint (OwlViTForObjectDetection
at small size, with its own tokenizer) loaded from any local folder holding one.

A detector knows one model and its pre/post-processing; it returns raw detections (boxes in pixels of the
image it was given, scores, the phrase each box answers). It knows nothing of thresholds for counting, NMS,
tiling or drawing (see grounding.py). An OWL detector may look twice (`views=2`, or `"views": 2` shipped in
CALIBRATION): at the image, and at the image cut by half a patch of the model's input at the top left. OWL-ViT
scores each object at the one patch nearest its centre, and a small trained detector scores an object whose
centre falls at some places of its patch grid far lower than at others (the thirteenth bundle's detector: one
person alone on grass below the counting threshold at 12% of the positions of a grid, 0% with the second view).
The two views' boxes are merged by the caller's NMS, where a box suppresses a weaker one of the other view above
`view_iou` (shipped too): the two boxes of one small blurry object can overlap less than NMS's 0.5. Other
backends look once. OWLv2's image processor needs scipy for its resize; we pad to a square and resize with PIL
ourselves (same geometry: pad bottom/right with gray, then resize), then let the processor rescale and normalise.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from toolvlm.tools import hf

log = logging.getLogger(__name__)

CALIBRATION = "toolvlm_detector.json"  # {"count_threshold": t, "grounding_threshold": t} beside the weights,
# optionally "count_thresholds": {phrase: t} for the phrases calibrated one by one ('dog', 'dogs', ...) and
# "views": 2 where the thresholds were calibrated looking twice, with "view_iou" for merging the views' boxes
_ARTICLE = re.compile(r"^(the|a|an)\s+")


def normalize_phrase(phrase: str) -> str:
    """Lower case, single spaces, no leading article or trailing full stop: 'The Tree.' -> 'tree' (calibration
    files key phrases so)."""
    text = " ".join(phrase.lower().strip().rstrip(".").split())
    return _ARTICLE.sub("", text)


@dataclass
class Detection:
    """One detected box: pixels of the image given, a score in [0, 1], the phrase it answers."""

    box: list[float]
    score: float
    label: str
    view: int = 0  # which view of the image it was seen in (0: the image as given)


class Detector:
    """Base class: a lazily loaded open-vocabulary detector."""

    backend = ""
    independent_phrases = False  # whether a box may answer several phrases of one call (post-processing of
    # OWL-ViT and Grounding DINO gives each box to its best phrase alone)

    def __init__(
        self,
        model: str | Path | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        views: int | None = None,
        view_iou: float | None = None,
    ) -> None:
        if views not in (None, 1, 2):
            raise ValueError(f"views must be 1 or 2 (None: what the weights ship), got {views!r}")
        self.model_path = model
        self.device = device
        self.dtype = dtype
        self.views = views  # None: the calibration's "views", else 1
        self.given_view_iou = view_iou  # None: the calibration's "view_iou", else NMS's own
        self.model: Any = None
        self.processor: Any = None
        self.calibration: dict[str, float] = {}  # thresholds shipped with the weights (CALIBRATION file)

    def load(self, tool: str = "grounding") -> None:
        """Load the model and processor from the local folder (once)."""
        if self.model is None:
            where = hf.model_folder(tool, self.backend, self.model_path, hub_ok=self.backend != "inhouse")
            with hf.loading(tool, self.backend, where):
                self._load(where)
            calibration = Path(where, CALIBRATION)
            if calibration.is_file():
                self.calibration = json.loads(calibration.read_text())

    def threshold(self, kind: str, default: float, phrase: str | None = None) -> float:
        """The calibrated score threshold of `kind` ("count" or "grounding") the weights ship, else `default`;
        with `phrase`, the phrase's own threshold where the weights ship one."""
        own = self.calibration.get(f"{kind}_thresholds", {})
        if phrase is not None and normalize_phrase(phrase) in own:
            return float(own[normalize_phrase(phrase)])
        return float(self.calibration.get(f"{kind}_threshold", default))

    @property
    def view_iou(self) -> float | None:
        """IoU above which a box suppresses a weaker one of another view: the one given, else the weights', else
        None (NMS's own)."""
        return self.given_view_iou if self.given_view_iou is not None else self.calibration.get("view_iou")

    @property
    def n_views(self) -> int:
        """How many views of an image the detector looks at: the one given, else the weights', else 1."""
        return self.views if self.views is not None else int(self.calibration.get("views", 1))

    def _load(self, folder: Path | str) -> None:
        raise NotImplementedError

    def detect(self, image: Image.Image, phrases: list[str], threshold: float) -> list[Detection]:
        """Boxes for each phrase with score >= threshold (no NMS)."""
        raise NotImplementedError


class OwlDetector(Detector):
    """OWL-ViT and OWLv2 (and the in-house OWL-ViT-architecture model)."""

    backend = "owlvit"
    model_type = "owlvit"

    def _load(self, folder: Path | str) -> None:
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder)
        if config.model_type != self.model_type:
            raise ValueError(
                f"backend {self.backend!r} expects a {self.model_type} checkpoint, but {folder} holds "
                f"model_type {config.model_type!r}"
            )
        cls = (
            transformers.Owlv2ForObjectDetection
            if self.model_type == "owlv2"
            else transformers.OwlViTForObjectDetection
        )
        self.processor = transformers.AutoProcessor.from_pretrained(folder)
        self.model = hf.place(cls.from_pretrained(folder, use_safetensors=True), self.device, self.dtype)

    def _pixels(self, image: Image.Image) -> dict[str, Any]:
        return {"images": image}

    def _frame(self, image: Image.Image) -> tuple[int, int]:
        """The size in pixels of what the model's input square shows (the image itself for OWL-ViT)."""
        return image.width, image.height

    def _views(self, image: Image.Image) -> list[tuple[Image.Image, int, int]]:
        """(view, x offset, y offset): the image, and with two views the image cut by half an input patch."""
        views = [(image, 0, 0)]
        if self.n_views == 2:
            vision = self.model.config.vision_config
            width, height = self._frame(image)
            dx = round(width * vision.patch_size / (2 * vision.image_size))
            dy = round(height * vision.patch_size / (2 * vision.image_size))
            if image.width > 2 * dx and image.height > 2 * dy:
                views.append((image.crop((dx, dy, image.width, image.height)), dx, dy))
        return views

    def _forward(self, image: Image.Image, phrases: list[str]) -> Any:
        """One forward pass on an image and its phrases; logits and boxes in float32."""
        import torch

        max_length = self.model.config.text_config.max_position_embeddings
        inputs = self.processor(
            text=[phrases],
            **self._pixels(image),
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=max_length,
        )
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        inputs = inputs.to(self.device)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        outputs.logits = outputs.logits.float()
        outputs.pred_boxes = outputs.pred_boxes.float()
        return outputs

    def detect(self, image: Image.Image, phrases: list[str], threshold: float) -> list[Detection]:
        """Run the model once per view on all phrases; labels are the phrases."""
        found = []
        for view, (pixels, dx, dy) in enumerate(self._views(image)):
            result = self.processor.post_process_grounded_object_detection(
                self._forward(pixels, phrases),
                threshold=threshold,
                target_sizes=[(pixels.height, pixels.width)],
                text_labels=[phrases],
            )[0]
            found += [
                Detection([box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy], float(score), label, view)
                for box, score, label in zip(
                    result["boxes"].tolist(), result["scores"].tolist(), result["text_labels"], strict=True
                )
            ]
        return found

    def phrase_scores(self, image: Image.Image, phrases: list[str]) -> tuple[np.ndarray, ...]:
        """Every predicted box of every view in pixels of `image` (N, 4), each phrase's own score (N, P) and the
        view it was seen in (N,): phrases scored independently, not each box given to its best phrase."""
        boxes, scores, views = [], [], []
        for view, (pixels, dx, dy) in enumerate(self._views(image)):
            outputs = self._forward(pixels, phrases)
            cx, cy, w, h = outputs.pred_boxes[0].cpu().numpy().T
            corners = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
            boxes.append(corners * np.array([pixels.width, pixels.height] * 2) + np.array([dx, dy] * 2))
            scores.append(outputs.logits[0].sigmoid().cpu().numpy())
            views.append(np.full(len(corners), view))
        return np.concatenate(boxes), np.concatenate(scores), np.concatenate(views)


class Owlv2Detector(OwlDetector):
    """OWLv2: the image is padded to a square before resizing, so boxes are relative to the square."""

    backend = "owlv2"
    model_type = "owlv2"

    def _pixels(self, image: Image.Image) -> dict[str, Any]:
        size = self.processor.image_processor.size
        side = max(image.size)
        square = Image.new("RGB", (side, side), (128, 128, 128))
        square.paste(image, (0, 0))
        resized = square.resize((size["width"], size["height"]), Image.Resampling.BILINEAR)
        return {"images": resized, "do_pad": False, "do_resize": False}

    def _frame(self, image: Image.Image) -> tuple[int, int]:
        return max(image.size), max(image.size)


class InhouseDetector(OwlDetector):
    """The default grounding model: OWL-ViT architecture at small size, trained in this project."""

    backend = "inhouse"
    model_type = "owlvit"


class GroundingDinoDetector(Detector):
    """Grounding DINO: phrases are joined as 'a. b.'; a box's label is the phrase whose tokens score highest."""

    backend = "grounding_dino"

    def _load(self, folder: Path | str) -> None:
        import transformers

        self.processor = transformers.AutoProcessor.from_pretrained(folder)
        model = transformers.AutoModelForZeroShotObjectDetection.from_pretrained(folder, use_safetensors=True)
        if model.config.model_type != "grounding-dino":
            raise ValueError(
                f"backend 'grounding_dino' got a {model.config.model_type!r} checkpoint in {folder}"
            )
        self.model = hf.place(model, self.device, self.dtype)

    def detect(self, image: Image.Image, phrases: list[str], threshold: float) -> list[Detection]:
        """Run once on 'p1. p2. ...'; score each query against each phrase's tokens."""
        import torch

        cleaned = [p.lower().strip().rstrip(".") for p in phrases]
        text = " ".join(f"{p}." for p in cleaned)
        spans, start = [], 0
        for p in cleaned:
            spans.append((start, start + len(p)))
            start += len(p) + 2
        inputs = self.processor(images=image, text=text, return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        inputs = inputs.to(self.device)
        offsets = self.processor.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        with torch.inference_mode():
            outputs = self.model(**inputs)
        outputs.logits = outputs.logits.float()
        outputs.pred_boxes = outputs.pred_boxes.float()
        # threshold -1 keeps every query, in order, so that our phrase scores line up with the boxes;
        # text_threshold 1 skips its label decoding (we score phrases ourselves below)
        result = self.processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=-1.0,
            text_threshold=1.0,
            target_sizes=[(image.height, image.width)],
        )[0]
        probs = outputs.logits[0].sigmoid()  # (queries, max_text_len)
        token_sets = [
            [t for t, (a, b) in enumerate(offsets) if b > a and a >= lo and b <= hi and t < probs.shape[1]]
            for lo, hi in spans
        ]
        detections = []
        for q, box in enumerate(result["boxes"].tolist()):
            scores = [float(probs[q, toks].max()) if toks else 0.0 for toks in token_sets]
            best = max(range(len(phrases)), key=scores.__getitem__)
            if scores[best] >= threshold:
                detections.append(Detection([float(c) for c in box], scores[best], phrases[best]))
        return detections


DETECTORS: dict[str, type[Detector]] = {
    "owlv2": Owlv2Detector,
    "owlvit": OwlDetector,
    "grounding_dino": GroundingDinoDetector,
    "inhouse": InhouseDetector,
}


def make_detector(tool: str, backend: str, **options: Any) -> Detector:
    """A detector for a backend name; raises ValueError listing the known backends."""
    if backend not in DETECTORS:
        raise hf.unknown_backend(tool, backend, list(DETECTORS))
    return DETECTORS[backend](**options)
