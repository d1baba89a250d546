"""Oracle tools for world scenes: the real tool classes with their models replaced by the scenes' annotations.

`WorldOracle` remembers which world scene each image shows (by a hash of its pixels). Its detector answers a
phrase with the exact boxes of the objects the phrase names, and its image backend draws a "similar image" by
rendering the edited layout with the world renderer, registering the new scene so that a later count on the
generated image is exact too (or, with `count_noise`, sometimes off by a few, as a real detector is, so that
a controller trained on these conversations learns to report what the tools said rather than guess; with
`miss_rate`, a phrase naming one object sometimes finds nothing at the default threshold, as a real detector's
weak box does, and is found at a low one, so that the controller learns to search again lower; with
`distractor_rate`, a phrase naming one object also finds other objects of its category at lower scores, as a real
detector does for 'the rightmost cloud', so that the controller learns to answer with the best box rather than
list them all; the oracle's default thresholds are the bundle detector's). Because
the tools are `GroundingTool`, `CounterTool` and `GeneratorTool` themselves, their texts, drawn images and
artifacts are exactly what the real tools give the controller: the data builders and the controller evaluation
need no tool weights.

It knows world scenes and the tool classes; not conversations, models or training.
"""

from __future__ import annotations

import hashlib
import logging
import random

from PIL import Image

from toolvlm.tools.base import Tool
from toolvlm.tools.captioner import CaptionerTool
from toolvlm.tools.counter import CounterTool
from toolvlm.tools.detectors import Detection, Detector, normalize_phrase
from toolvlm.tools.generator import GeneratorTool
from toolvlm.tools.grounding import GroundingTool
from toolvlm.tools.image_backends import ImageBackend
from toolvlm.tools.layout import Layout
from toolvlm.vlm.images import image_key
from toolvlm.world import Object, Scene, referring_expressions, render_scene
from toolvlm.world.scene import CATEGORIES, DEFAULT_COLOUR, PALETTES
from toolvlm.world.text import describe, plural

logger = logging.getLogger(__name__)

ORACLE_SCORE = 0.99
MISS_SCORE = 0.15  # the score of a missed object: found only by a search at a threshold this low
DISTRACTOR_SCORES = (0.3, 0.8)  # the range of scores of the other objects a one-object phrase finds too
MAX_DISTRACTORS = 2
THRESHOLDS = {"grounding_threshold": 0.3, "count_threshold": 0.3}  # as the bundle detector's calibration
_PLURALS = {plural(c): c for c in CATEGORIES}


def category_of(phrase: str) -> str | None:
    """The world category a phrase names ('people' -> 'person', 'the red car' -> 'car'), or None."""
    words = normalize_phrase(phrase).split()
    for word in words:
        if word in CATEGORIES:
            return word
        if word in _PLURALS:
            return _PLURALS[word]
    return None


def phrase_targets(scene: Scene, phrase: str) -> list[int]:
    """Indices of the objects a phrase names: a category, a coloured category, or a referring expression."""
    text = normalize_phrase(phrase)
    for expr in referring_expressions(scene):
        if normalize_phrase(expr["text"]) == text:
            return [expr["target"]]
    out = []
    for i, obj in enumerate(scene.objects):
        names = {obj.category, plural(obj.category)}
        if obj.color:
            names |= {describe(obj.category, obj.color), describe(obj.category, obj.color, 2)}
        if text in names:
            out.append(i)
    return out


class WorldOracle:
    """Scenes by image content, with the detector and image backend that answer from them."""

    def __init__(
        self, count_noise: float = 0.0, seed: int = 0, miss_rate: float = 0.0, distractor_rate: float = 0.0
    ) -> None:
        rates = {"count_noise": count_noise, "miss_rate": miss_rate, "distractor_rate": distractor_rate}
        for name, p in rates.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} is a probability, got {p}")
        self.seed = seed
        self.count_noise, self.miss_rate, self.distractor_rate = count_noise, miss_rate, distractor_rate
        self.scenes: dict[str, Scene] = {}
        self.last_scene: Scene | None = (
            None  # the scene the detector last looked at (a generator's reference)
        )

    def register(self, image: Image.Image, scene: Scene) -> None:
        """Remember that `image` shows `scene`."""
        self.scenes[image_key(image)] = scene

    def scene_of(self, image: Image.Image) -> Scene | None:
        """The scene `image` shows, or None for an image the oracle has not seen."""
        return self.scenes.get(self.key(image))

    @staticmethod
    def key(image: Image.Image) -> str:
        """The key an image's scene is remembered under (a hash of its RGB pixels)."""
        return image_key(image.convert("RGB"))

    def render(self, scene: Scene) -> Image.Image:
        """Render a scene and remember it."""
        image = render_scene(scene)
        self.register(image, scene)
        return image

    def tools(self) -> dict[str, Tool]:
        """Grounding, counter, generator and (grounded) captioner tools answering from the scenes (names as the
        real tools)."""
        grounding = GroundingTool(backend="inhouse", geometry=False)  # the oracle reads whole expressions
        grounding.detector = OracleDetector(self)
        counter = CounterTool(backend="inhouse", grounding=grounding)
        generator = GeneratorTool(
            backend="inhouse", grounding=grounding, counter=counter
        )  # re-counts, as built
        generator.backend = OracleBackend(self)
        captioner = CaptionerTool("grounded", grounding=grounding, vocabulary=list(CATEGORIES))
        return {t.name: t for t in (grounding, counter, generator, captioner)}


class OracleDetector(Detector):
    """Exact boxes from the scene of the image; no weights."""

    backend = "world_oracle"

    def __init__(self, oracle: WorldOracle) -> None:
        super().__init__()
        self.oracle = oracle
        self.model = self  # nothing to load
        self.calibration = dict(THRESHOLDS)

    def load(self, tool: str = "grounding") -> None:
        """Nothing to load."""

    def detect(self, image: Image.Image, phrases: list[str], threshold: float) -> list[Detection]:
        """The boxes of the objects each phrase names (none for an unknown image)."""
        key = self.oracle.key(image)
        scene = self.oracle.scenes.get(key)
        if scene is None:
            logger.warning("oracle detector: an image of no known world scene; no boxes")
            return []
        self.oracle.last_scene = scene
        return [det for phrase in phrases for det in self._detect_one(scene, phrase, key, threshold)]

    def _detect_one(self, scene: Scene, phrase: str, key: str, threshold: float) -> list[Detection]:
        """The phrase's exact boxes; with the oracle's `count_noise`, a group of 2+ sometimes loses or gains a
        few; with `miss_rate`, a single object is sometimes found only at thresholds <= MISS_SCORE; with
        `distractor_rate`, a single object comes first and up to MAX_DISTRACTORS others of its category after it,
        scored lower (the same answer every time this image is asked for this phrase)."""
        targets = phrase_targets(scene, phrase)
        boxes = [[float(v) for v in scene.objects[i].box] for i in targets]
        digest = hashlib.sha256(f"{self.oracle.seed}|{key}|{normalize_phrase(phrase)}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        draw = rng.random()
        if len(boxes) >= 2 and draw < self.oracle.count_noise:  # a group
            boxes = _perturbed(boxes, rng, scene.width, scene.height)
        elif len(boxes) == 1 and draw < self.oracle.miss_rate:  # one object, with a weak score
            return [Detection(boxes[0], MISS_SCORE, phrase)] if threshold <= MISS_SCORE else []
        found = [Detection(box, ORACLE_SCORE, phrase) for box in boxes]
        if len(boxes) == 1 and rng.random() < self.oracle.distractor_rate:  # others of its kind, weaker
            category = scene.objects[targets[0]].category
            others = [o for i, o in enumerate(scene.objects) if o.category == category and i != targets[0]]
            for obj in rng.sample(others, min(MAX_DISTRACTORS, len(others))):
                score = rng.uniform(*DISTRACTOR_SCORES)
                if score >= threshold:
                    found.append(Detection([float(v) for v in obj.box], score, phrase))
        return found


class OracleBackend(ImageBackend):
    """Renders a layout with the world renderer, keeping the reference scene's other objects."""

    backend = "world_oracle"
    supports_layout = True
    size_multiple = 1

    def __init__(self, oracle: WorldOracle) -> None:
        super().__init__()
        self.oracle = oracle
        self.pipe = self
        self.reference: Scene | None = None

    def load(self) -> None:
        """Nothing to load."""

    def default_size(self) -> tuple[int, int]:
        """The size of the world's canvas."""
        return 224, 224

    def canonical(self, label: str) -> str:
        """The category a phrase names (unchanged when it names none)."""
        return category_of(label) or label

    def text(self, prompt: str, seed: int, steps: int, width: int, height: int) -> Image.Image:
        """Text-to-image is not modelled by the oracle: an empty meadow."""
        return self.oracle.render(Scene(width=width, height=height, family="oracle", seed=seed))

    def layout(self, prompt: str | None, layout: Layout, seed: int, steps: int) -> Image.Image:
        """The layout's objects drawn into the most recent reference scene (or an empty park)."""
        base = self._last_reference(layout)
        rng = random.Random(seed)
        labels = set(layout.labels)
        sx, sy = layout.width / base.width, layout.height / base.height
        kept = [
            Object(o.category, _scaled(o.box, sx, sy), o.color, o.pose, o.place, o.facing)
            for o in base.objects
            if o.category not in labels
        ]
        originals = {c: [o for o in base.objects if o.category == c] for c in labels}
        for box, label in zip(layout.boxes, layout.labels, strict=True):
            if label not in CATEGORIES:
                continue
            pool = originals.get(label) or []
            template = pool.pop(0) if pool else None
            color = template.color if template else _colour(label, rng)
            pose = template.pose if template else ("standing" if label in ("person", "dog") else None)
            place = (
                template.place
                if template
                else ("in the sky" if label in ("sun", "cloud") else "on the grass")
            )
            kept.append(
                Object(label, [round(v) for v in box], color, pose, place, rng.choice(("left", "right")))
            )
        scene = Scene(
            layout.width, layout.height, base.background, round(base.horizon * sy), kept, "oracle", seed
        )
        return self.oracle.render(scene)

    def _last_reference(self, layout: Layout) -> Scene:
        return self.oracle.last_scene or Scene(layout.width, layout.height)


def _perturbed(boxes: list[list[float]], rng: random.Random, width: int, height: int) -> list[list[float]]:
    """`boxes` with 1..(10% + 1) of them dropped, or as many shifted copies added (a detector's miscount)."""
    k = rng.randint(1, max(1, round(0.1 * len(boxes))) + 1)
    if rng.random() < 0.5 and k < len(boxes):
        dropped = set(rng.sample(range(len(boxes)), k))
        return [b for i, b in enumerate(boxes) if i not in dropped]
    extra = []
    for box in rng.sample(boxes, min(k, len(boxes))):
        w, h = box[2] - box[0], box[3] - box[1]
        dx = min(max(rng.uniform(-w, w), -box[0]), width - box[2])
        dy = min(max(rng.uniform(-0.3 * h, 0.3 * h), -box[1]), height - box[3])
        extra.append([box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy])
    return boxes + extra


def _scaled(box: list[int], sx: float, sy: float) -> list[int]:
    return [round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)]


def _colour(category: str, rng: random.Random) -> str | None:
    palette = PALETTES.get(category)
    return rng.choice(palette) if palette else DEFAULT_COLOUR.get(category)
