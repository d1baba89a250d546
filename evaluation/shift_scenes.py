"""A second scene composer for the distribution-shift evaluation, written apart from the training sampler.

`compose_scene(seed)` draws a world `Scene` (the same dataclasses, categories and colours as the world, drawn by
the same `world.draw` renderer) with none of `world.sample`'s layout rules: any horizon row, including all grass
(no sky) and all sky; ground objects anywhere on the canvas, not on a perspective ground line; sizes drawn per
scene over a wider range (tiny and large people); 0-60 people; objects overlapping each other (each keeps at
least `1 - max_hidden` of its box unpainted by objects painted after it, so it stays countable). Deterministic in
the seed, from its own random stream.

Evaluation only: training code (world/, finetune/) must never import this module,
so that the shifted set stays a set the controller never trained on. It knows scenes, not words or models.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from toolvlm.world.scene import (
    CATEGORIES,
    FLYING_CATEGORIES,
    PALETTES,
    POSES,
    SKY_CATEGORIES,
    Object,
    Scene,
    draw_order,
)

# Width over height of each drawn shape (before a +-15% jitter); a dog lying and things in flight are wider.
SHAPE: dict[str, float] = {
    "person": 0.42,
    "tree": 0.78,
    "dog": 1.45,
    "frisbee": 1.9,
    "ball": 1.0,
    "car": 2.0,
    "house": 1.15,
    "bench": 1.9,
    "bird": 1.15,
    "flower": 0.6,
    "cloud": 1.9,
    "sun": 1.0,
}
# Object heights in pixels on a 224-pixel canvas: (smallest, largest); a scene draws its own scale in between.
HEIGHTS: dict[str, tuple[int, int]] = {
    "person": (10, 150),
    "tree": (22, 190),
    "dog": (9, 90),
    "frisbee": (6, 30),
    "ball": (7, 40),
    "car": (10, 90),
    "house": (24, 170),
    "bench": (8, 60),
    "bird": (7, 45),
    "flower": (9, 55),
    "cloud": (12, 70),
    "sun": (14, 80),
}
# Horizon styles and their weights: all grass (no sky), all sky, a high, middle or low horizon, a street.
HORIZONS: dict[str, float] = {
    "grass": 0.3,
    "sky": 0.05,
    "high": 0.2,
    "middle": 0.15,
    "low": 0.15,
    "street": 0.15,
}


@dataclass
class ShiftConfig:
    """How shifted scenes are composed: canvas, people, other objects, overlap; round-trips to JSON."""

    width: int = 224
    height: int = 224
    min_people: int = 0
    max_people: int = 60
    # share of scenes with no person (the rest draw a head count uniformly from one of three bands)
    no_people: float = 0.1
    people_bands: tuple[tuple[int, int], ...] = ((1, 8), (9, 30), (31, 60))
    # chance that each other category is in a scene, and the most of it
    other_chance: float = 0.35
    max_others: int = 5
    # the most of an object's box that objects painted after it may cover
    max_hidden: float = 0.5
    horizon_weights: dict[str, float] = field(default_factory=lambda: dict(HORIZONS))
    tries: int = 60  # placements tried per object before it is left out

    def __post_init__(self) -> None:
        if not 0 <= self.min_people <= self.max_people:
            raise ValueError(f"need 0 <= min_people <= max_people, got {self.min_people}, {self.max_people}")
        if not 0.0 <= self.max_hidden < 1.0:
            raise ValueError(f"max_hidden is a fraction in [0, 1), got {self.max_hidden}")
        unknown = set(self.horizon_weights) - set(HORIZONS)
        if unknown:
            raise ValueError(f"unknown horizon styles {sorted(unknown)}; styles are: {', '.join(HORIZONS)}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def shift_rng(seed: int | str) -> random.Random:
    """The random stream of shifted scene `seed` (a string seed: no draw repeats a world sampler's stream)."""
    return random.Random(f"shift-scene/{seed}")


def _horizon(style: str, height: int, rng: random.Random) -> tuple[str, int]:
    """(background, horizon row) of a horizon style."""
    if style == "grass":
        return "grass", 0
    if style == "sky":
        return "sky", height
    if style == "street":
        return "street", round(rng.uniform(0.15, 0.55) * height)
    low, high = {"high": (0.05, 0.3), "middle": (0.3, 0.55), "low": (0.55, 0.8)}[style]
    return "park", round(rng.uniform(low, high) * height)


def _people_count(config: ShiftConfig, rng: random.Random) -> int:
    if rng.random() < config.no_people:
        return config.min_people
    low, high = rng.choice(config.people_bands)
    return max(config.min_people, min(config.max_people, rng.randint(low, high)))


def _person_height(n: int, scale: float, config: ShiftConfig) -> tuple[float, float]:
    """The range a scene's people heights are drawn from: a scene-wide scale, capped so that n people fit."""
    low, high = HEIGHTS["person"]
    area = config.width * config.height
    # n boxes of h * 0.42h should take at most ~60% of the canvas, so that they fit with bounded overlap
    fit = math.sqrt(0.6 * area / max(n, 1) / SHAPE["person"]) if n else high
    top = max(low, min(high, fit))
    centre = low * (top / low) ** scale  # log-uniform between the smallest and the cap
    return max(low, 0.75 * centre), min(top, 1.25 * centre)


class _Canvas:
    """Placed objects with the pixels of each box that objects painted later cover (the occlusion check)."""

    def __init__(self, scene: Scene, max_hidden: float) -> None:
        self.scene, self.max_hidden = scene, max_hidden
        self.covered: list[np.ndarray] = []

    def try_add(self, obj: Object) -> bool:
        """Add `obj` if no object (it included) would be hidden more than `max_hidden`; whether it was added."""
        objects = self.scene.objects
        order = draw_order(Scene(objects=[*objects, obj]))
        rank = {i: r for r, i in enumerate(order)}
        new = len(objects)
        mine = np.zeros((obj.height, obj.width), dtype=bool)
        updates = []
        for j, other in enumerate(objects):
            overlap = _intersection(obj.box, other.box)
            if overlap is None:
                continue
            if rank[j] < rank[new]:  # painted before obj: obj covers part of it
                mask = self.covered[j].copy()
                _mark(mask, other.box, overlap)
                if mask.mean() > self.max_hidden:
                    return False
                updates.append((j, mask))
            else:  # painted after obj: it covers part of obj
                _mark(mine, obj.box, overlap)
        if mine.mean() > self.max_hidden:
            return False
        for j, mask in updates:
            self.covered[j] = mask
        objects.append(obj)
        self.covered.append(mine)
        return True


def _intersection(a: list[int], b: list[int]) -> list[int] | None:
    box = [max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])]
    return box if box[2] > box[0] and box[3] > box[1] else None


def _mark(mask: np.ndarray, box: list[int], part: list[int]) -> None:
    mask[part[1] - box[1] : part[3] - box[1], part[0] - box[0] : part[2] - box[0]] = True


def _object(
    category: str, height: float, scene: Scene, rng: random.Random, region: tuple[int, int]
) -> Object | None:
    """One object of `category` about `height` pixels tall, its box inside the canvas, its top in `region`."""
    pose = rng.choice(POSES[category]) if category in POSES else None
    shape = SHAPE[category] * (1.2 if pose == "lying" else 1.0) * rng.uniform(0.85, 1.15)
    h = max(HEIGHTS[category][0], min(round(height), scene.height))
    if category in SKY_CATEGORIES:
        h = min(h, scene.horizon)
    w = max(3, min(round(h * shape), scene.width))
    top_low, top_high = region
    top_high = min(top_high, scene.height - h)
    if category in SKY_CATEGORIES:  # in the sky: at most a quarter of it below the horizon
        top_high = min(top_high, scene.horizon - h + h // 4)
    if top_high < top_low:
        return None
    x0, y0 = rng.randint(0, scene.width - w), rng.randint(top_low, top_high)
    box = [x0, y0, x0 + w, y0 + h]
    colour = rng.choice(PALETTES[category]) if category in PALETTES else None
    return Object(
        category, box, colour, pose, _place(category, box, scene, rng), rng.choice(("left", "right"))
    )


def _place(category: str, box: list[int], scene: Scene, rng: random.Random) -> str | None:
    """Where the object is, for captions: the sky, the air (flyers above the ground, or tossed), road or grass."""
    if category in SKY_CATEGORIES:
        return "in the sky"
    if category in FLYING_CATEGORIES and (box[3] <= scene.horizon or rng.random() < 0.3):
        return "in the air"
    if scene.background == "sky":
        return None
    if category == "car" and scene.background == "street" and box[3] > scene.horizon:
        return "on the road"
    return "on the grass"


def compose_scene(seed: int | str, config: ShiftConfig | None = None) -> Scene:
    """A shifted scene, the same for the same seed and config."""
    config = config or ShiftConfig()
    rng = shift_rng(seed)
    styles = list(config.horizon_weights)
    style = rng.choices(styles, [config.horizon_weights[s] for s in styles])[0]
    background, horizon = _horizon(style, config.height, rng)
    scene = Scene(config.width, config.height, background, horizon, [], "shift", None)
    scene.seed = seed if isinstance(seed, int) else None
    canvas = _Canvas(scene, config.max_hidden)
    wanted: list[tuple[str, float]] = []
    for category in CATEGORIES:
        if category == "person":
            continue
        if category in SKY_CATEGORIES and horizon < 24:  # no sky to put it in
            continue
        if category == "sun" and rng.random() < config.other_chance:
            wanted.append(("sun", 1.0))
        elif category != "sun" and rng.random() < config.other_chance:
            scale = rng.random()
            wanted += [(category, scale)] * rng.randint(1, config.max_others)
    n_people = _people_count(config, rng)
    low, high = _person_height(n_people, rng.random(), config)
    # big things first, so that crowds fill the space between them
    wanted.sort(key=lambda item: -HEIGHTS[item[0]][1])
    for category, scale in wanted:
        small, large = HEIGHTS[category]
        height = small * (large / small) ** (scale * rng.uniform(0.8, 1.2))
        region = (0, config.height)
        _place_one(canvas, category, lambda h=height: h, scene, rng, region, config.tries)
    for _ in range(n_people):
        _place_one(
            canvas, "person", lambda: rng.uniform(low, high), scene, rng, (0, config.height), config.tries
        )
    return scene


def _place_one(
    canvas: _Canvas, category: str, height: Any, scene: Scene, rng: random.Random, region: tuple[int, int],
    tries: int,
) -> bool:  # fmt: skip
    """Try placements (shrinking a little after every ten misses) until one fits; whether one did."""
    shrink = 1.0
    for attempt in range(tries):
        if attempt and attempt % 10 == 0:
            shrink *= 0.85
        obj = _object(category, height() * shrink, scene, rng, region)
        if obj is not None and canvas.try_add(obj):
            return True
    return False


def hidden_fractions(scene: Scene) -> list[float]:
    """For each object, the share of its box that objects painted after it cover (0: fully in view)."""
    order = draw_order(scene)
    out = []
    for r, i in enumerate(order):
        obj = scene.objects[i]
        mask = np.zeros((obj.height, obj.width), dtype=bool)
        for j in order[r + 1 :]:
            part = _intersection(obj.box, scene.objects[j].box)
            if part is not None:
                _mark(mask, obj.box, part)
        out.append((i, float(mask.mean())))
    return [f for _, f in sorted(out)]
