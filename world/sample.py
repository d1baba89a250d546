"""Random scenes of the world, deterministic per seed: four families (crowd, dog and frisbee, street, mixed) and
two more that no default mix draws (a detector's recipe can ask for them): `composed` and `scattered`.

Ground objects follow a simple perspective: the horizon row is depth 0, the bottom row depth 1, and an object's
size grows with its depth (small people far up, big people near the bottom). Every box lies inside the canvas,
and an object may hide at most `WorldConfig.max_overlap` of the box of any object painted before it, so every
object stays recognisable. The composed family drops the perspective and the family layouts: objects of any
category at any place and size, on any background (half of them all grass), as people compose scenes for
`toolvlm world render`. The scattered family widens that again: one category in numbers from none to
`max_people` (for people) at one scene-wide scale from tiny to near the canvas height, anywhere on any ground
(all grass, all sky or a horizon row anywhere), with more occlusion allowed. This module only makes `Scene` data; it draws nothing and writes no words.
"""

from __future__ import annotations

import logging
import math
import random

from toolvlm.world.scene import (
    FAMILIES,
    FLYING_CATEGORIES,
    PALETTES,
    Object,
    Scene,
    WorldConfig,
    default_horizon,
    infer_place,
    layer,
    road_top,
)

logger = logging.getLogger(__name__)

# Height of an object at depth 1 (the bottom row), as a fraction of the canvas height.
REF_HEIGHT: dict[str, float] = {
    "person": 0.40,
    "tree": 0.62,
    "dog": 0.21,
    "frisbee": 0.055,
    "ball": 0.075,
    "car": 0.22,
    "house": 0.50,
    "bench": 0.16,
    "bird": 0.07,
    "flower": 0.10,
    "cloud": 0.12,
    "sun": 0.13,
}
# Smallest height in pixels on a 224-pixel canvas (scaled with the canvas): below this a shape is unreadable.
MIN_HEIGHT: dict[str, int] = {
    "person": 12,
    "tree": 28,
    "dog": 11,
    "frisbee": 6,
    "ball": 8,
    "car": 12,
    "house": 28,
    "bench": 9,
    "bird": 8,
    "flower": 10,
    "cloud": 14,
    "sun": 16,
}
CROWD_PERSON_SCALE = 0.72  # people in a crowd are seen from further away


def aspect(category: str, pose: str | None, place: str | None) -> float:
    """Width over height of a category's silhouette in a pose and place."""
    if category == "dog":
        return 2.0 if pose == "lying" else 1.35
    if category == "frisbee":
        return 2.2 if place == "in the air" else 2.8
    if category == "bird":
        return 1.5 if place == "in the air" else 1.2
    return {
        "person": 0.4,
        "tree": 0.68,
        "ball": 1.0,
        "car": 2.1,
        "house": 1.1,
        "bench": 2.2,
        "flower": 0.6,
        "cloud": 1.9,
        "sun": 1.0,
    }[category]


def _overlap_ok(a: Object, ia: int, b: Object, ib: int, limit: float) -> bool:
    """Whether the later-painted of a and b hides at most `limit` of the earlier one's box."""
    ix = min(a.box[2], b.box[2]) - max(a.box[0], b.box[0])
    iy = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
    if ix <= 0 or iy <= 0:
        return True
    behind = min((a, ia), (b, ib), key=lambda t: (layer(t[0]), t[0].box[3], t[1]))[0]
    return ix * iy <= limit * behind.width * behind.height


class _Builder:
    """Places objects one by one into a scene, refusing those that hide too much of another."""

    def __init__(self, rng: random.Random, config: WorldConfig, family: str, background: str, horizon: int):
        self.rng = rng
        self.config = config
        self.scene = Scene(config.width, config.height, background, horizon, [], family)
        self.unit = config.height / 224

    @property
    def W(self) -> int:  # canvas width, named as in the maths
        return self.scene.width

    @property
    def H(self) -> int:
        return self.scene.height

    def color(self, category: str) -> str | None:
        palette = PALETTES.get(category)
        return self.rng.choice(palette) if palette else None

    def size(self, category: str, scale: float, pose: str | None, place: str | None) -> tuple[int, int]:
        h = REF_HEIGHT[category] * self.H * scale * self.rng.uniform(0.9, 1.1)
        h = max(h, MIN_HEIGHT[category] * self.unit)
        w = h * aspect(category, pose, place)
        return max(2, min(self.W, round(w))), max(2, min(self.H, round(h)))

    def add(self, obj: Object, limit: float | None = None) -> bool:
        limit = self.config.max_overlap if limit is None else limit
        n = len(self.scene.objects)
        if all(_overlap_ok(obj, n, o, i, limit) for i, o in enumerate(self.scene.objects)):
            self.scene.objects.append(obj)
            return True
        return False

    def _make(self, category: str, w: int, h: int, x0: int, bottom: int, **attrs) -> Object:
        x0 = min(max(0, x0), self.W - w)
        bottom = min(max(h, bottom), self.H)
        return Object(category, [x0, bottom - h, x0 + w, bottom], **attrs)

    def ground(
        self,
        category: str,
        depth: tuple[float, float] = (0.3, 1.0),
        color: str | None = None,
        pose: str | None = None,
        place: str = "on the grass",
        scale: float = 1.0,
        xs: tuple[float, float] = (0.0, 1.0),
        tries: int = 60,
        limit: float | None = None,
    ) -> Object | None:
        """Put an object standing on the ground at a random depth in `depth`, horizontal position in `xs`."""
        color = color or self.color(category)
        if pose is None:
            pose = {"person": "standing", "dog": "standing"}.get(category)
        span = self.H - self.scene.horizon
        for _ in range(tries):
            d = self.rng.uniform(*depth)
            bottom = self.scene.horizon + max(1, round(d * span))
            w, h = self.size(category, max(d, 0.05) * scale, pose, place)
            if h > bottom:
                w, h = max(2, round(w * bottom / h)), bottom
            x0 = round(self.rng.uniform(*xs) * (self.W - w))
            obj = self._make(category, w, h, x0, bottom, color=color, pose=pose, place=place)
            obj.facing = self.rng.choice(("left", "right"))
            if self.add(obj, limit):
                return obj
        return None

    def air(self, category: str, color: str | None = None, tries: int = 60) -> Object | None:
        """Put a frisbee, ball or bird in the air, above the near ground."""
        color = color or self.color(category)
        for _ in range(tries):
            w, h = self.size(category, self.rng.uniform(0.4, 0.9), None, "in the air")
            low = self.scene.horizon + round(0.25 * (self.H - self.scene.horizon))
            bottom = self.rng.randint(min(h + 2, low), max(h + 2, low))
            x0 = self.rng.randint(0, self.W - w)
            obj = self._make(category, w, h, x0, bottom, color=color, place="in the air")
            obj.facing = self.rng.choice(("left", "right"))
            if self.add(obj):
                return obj
        return None

    def sky(self, category: str, tries: int = 30) -> Object | None:
        """Put the sun or a cloud in the sky above the horizon."""
        for _ in range(tries):
            w, h = self.size(category, self.rng.uniform(0.8, 1.3), None, "in the sky")
            if h + 2 > self.scene.horizon:
                return None
            bottom = self.rng.randint(h + 1, self.scene.horizon - 1)
            x0 = self.rng.randint(0, self.W - w)
            if self.add(self._make(category, w, h, x0, bottom, place="in the sky"), 0.1):
                return self.scene.objects[-1]
        return None

    def next_to(self, anchor: Object, category: str, color: str | None = None) -> Object | None:
        """Put an object on the grass beside `anchor`, at its depth (so the two are 'next to' each other)."""
        color = color or self.color(category)
        span = self.H - self.scene.horizon
        depth = (anchor.box[3] - self.scene.horizon) / span
        for _ in range(30):
            w, h = self.size(category, max(depth, 0.05), None, "on the grass")
            bottom = anchor.box[3] + self.rng.randint(-2, 2)
            gap = round(self.rng.uniform(0.05, 0.3) * anchor.width)
            side = self.rng.choice(("left", "right"))
            x0 = anchor.box[2] + gap if side == "right" else anchor.box[0] - gap - w
            if x0 < 0 or x0 + w > self.W:
                x0 = anchor.box[0] - gap - w if side == "right" else anchor.box[2] + gap
            if x0 < 0 or x0 + w > self.W or bottom > self.H:
                continue
            obj = self._make(category, w, h, x0, bottom, color=color, place="on the grass")
            if self.add(obj):
                anchor.facing = "right" if obj.cx > anchor.cx else "left"
                return obj
        return None

    def sky_dressing(self, p_sun: float = 0.5, max_clouds: int = 3) -> None:
        if self.rng.random() < p_sun:
            self.sky("sun")
        for _ in range(self.rng.randint(0, max_clouds)):
            self.sky("cloud")


def _crowd(b: _Builder) -> None:
    b.sky_dressing()
    cfg, rng = b.config, b.rng
    sides = [(0.0, 0.35), (0.65, 1.0)]
    rng.shuffle(sides)
    for xs in sides[: rng.choice((1, 1, 2))]:  # one tree, or two on opposite sides
        b.ground("tree", depth=(0.15, 0.55), xs=xs, scale=1.4)
    n = rng.randint(cfg.min_people, cfg.max_people)
    placed = 0
    for limit in (cfg.max_overlap, cfg.max_overlap * 1.5, cfg.max_overlap * 2):
        while placed < n:
            depth = (0.06, 1.0)
            if b.ground("person", depth=depth, scale=CROWD_PERSON_SCALE, tries=80, limit=limit) is None:
                break
            placed += 1
    if placed < n:
        logger.debug("crowd: placed %d of %d people", placed, n)
    if rng.random() < 0.2:
        b.ground("dog", depth=(0.5, 1.0), pose=rng.choice(("standing", "lying")))
    if rng.random() < 0.15:
        b.ground("ball", depth=(0.5, 1.0))


def _dog_frisbee(b: _Builder) -> None:
    rng = b.rng
    b.sky_dressing()
    dog = b.ground("dog", depth=(0.55, 0.95), pose="lying" if rng.random() < 0.6 else "standing")
    frisbee_color = "red" if rng.random() < 0.4 else None
    if dog is not None:
        if rng.random() < 0.75:
            b.next_to(dog, "frisbee", frisbee_color)
        else:
            b.air("frisbee", frisbee_color)
    for _ in range(rng.choice((0, 0, 1, 2))):
        b.ground("tree", depth=(0.1, 0.5), scale=1.3)
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        b.ground("person", depth=(0.3, 0.9))
    if rng.random() < 0.3:
        b.ground("ball", depth=(0.4, 1.0)) if rng.random() < 0.6 else b.air("ball")
    if rng.random() < 0.3:
        b.air("bird") if rng.random() < 0.6 else b.ground("bird", depth=(0.4, 1.0))
    for _ in range(rng.choice((0, 0, 1, 2, 3))):
        b.ground("flower", depth=(0.4, 1.0))


def _street(b: _Builder) -> None:
    rng = b.rng
    b.sky_dressing(max_clouds=2)
    span = b.H - b.scene.horizon
    road = (road_top(b.scene) - b.scene.horizon) / span
    for _ in range(rng.choice((1, 1, 2))):
        b.ground("house", depth=(0.02, 0.12), scale=2.6)
    for _ in range(rng.choice((1, 1, 2, 3))):
        b.ground("car", depth=(road + 0.3 * (1 - road), 1.0), place="on the road")
    if rng.random() < 0.6:
        b.ground("bench", depth=(0.3, road - 0.02))
    for _ in range(rng.choice((0, 1, 2, 3, 4))):
        b.ground("person", depth=(0.2, road - 0.02))
    for _ in range(rng.choice((0, 1, 1, 2))):
        b.ground("tree", depth=(0.05, 0.3), scale=1.4)
    if rng.random() < 0.3:
        b.air("bird")


_MIXED_POOL = ("person", "tree", "dog", "frisbee", "ball", "car", "house", "bench", "bird", "flower")
_MIXED_WEIGHTS = (4, 2, 2, 2, 2, 1.5, 1, 1.5, 2, 2)


def _mixed(b: _Builder) -> None:
    rng = b.rng
    b.sky_dressing(p_sun=0.4, max_clouds=2)
    for category in rng.choices(_MIXED_POOL, _MIXED_WEIGHTS, k=rng.randint(3, 10)):
        flies = (
            category in ("frisbee", "ball")
            and rng.random() < 0.35
            or category == "bird"
            and rng.random() < 0.6
        )
        if flies:
            b.air(category)
        elif category == "house":
            b.ground("house", depth=(0.02, 0.2), scale=2.2)
        elif category == "tree":
            b.ground("tree", depth=(0.1, 0.6), scale=1.2)
        elif category == "dog":
            b.ground("dog", depth=(0.3, 1.0), pose=rng.choice(("standing", "lying")))
        else:
            b.ground(category, depth=(0.25, 1.0))


COMPOSED_BACKGROUNDS = ("grass", "grass", "park", "street")  # all grass: what no other family shows


def _composed(b: _Builder) -> None:
    """Objects of the mixed pool anywhere below the horizon (flyers half the time above it), any size."""
    rng, scene = b.rng, b.scene
    if scene.horizon > 0:
        b.sky_dressing(p_sun=0.3, max_clouds=2)
    road = road_top(scene)
    for category in rng.choices(_MIXED_POOL, _MIXED_WEIGHTS, k=rng.randint(2, 12)):
        pose = {"person": "standing", "dog": rng.choice(("standing", "lying"))}.get(category)
        flies = category in ("frisbee", "ball", "bird") and scene.horizon > 0 and rng.random() < 0.5
        for _ in range(30):
            h = rng.uniform(MIN_HEIGHT[category] * b.unit, 1.3 * REF_HEIGHT[category] * b.H)
            w = h * aspect(category, pose, "in the air" if flies else "on the grass")
            w, h = max(2, min(b.W, round(w))), max(2, min(b.H, round(h)))
            top = min(h, scene.horizon) if flies else min(max(h, scene.horizon + 4), b.H)
            bottom = rng.randint(top, scene.horizon if flies else b.H)
            obj = b._make(category, w, h, rng.randint(0, b.W - w), bottom, color=b.color(category), pose=pose)
            obj.place = infer_place(category, obj.box, scene.background, scene.horizon, road)
            obj.facing = rng.choice(("left", "right"))
            if b.add(obj):
                break


SCATTERED_POOL = ("person", "tree", "dog", "ball", "car", "house", "bench", "bird", "flower", "frisbee")
SCATTERED_WEIGHTS = (6, 1, 1.5, 1, 1, 0.5, 0.7, 1.2, 1, 0.6)
SCATTERED_BACKGROUNDS = ("grass", "grass", "park", "park", "street", "sky")


def _scattered_size(b: _Builder, category: str, base: float, flies: bool) -> tuple[int, int]:
    """A size near the scene's scale `base` (a fraction of REF_HEIGHT) with a per-object jitter."""
    low = MIN_HEIGHT[category] * b.unit
    h = max(low, REF_HEIGHT[category] * b.H * base * b.rng.uniform(0.75, 1.3))
    w = h * aspect(category, None, "in the air" if flies else "on the grass")
    return max(2, min(b.W, round(w))), max(2, min(b.H - 1, round(h)))


def _scatter(b: _Builder, category: str, n: int, base: float, limit: float) -> int:
    """Place up to n objects of a category anywhere they can stand (flyers also in the sky); returns the count."""
    rng, scene = b.rng, b.scene
    road = road_top(scene)
    placed = 0
    for _ in range(n):
        pose = {"person": "standing", "dog": rng.choice(("standing", "lying"))}.get(category)
        for _ in range(40):
            flies = category in FLYING_CATEGORIES and (scene.horizon >= b.H or rng.random() < 0.4)
            if not flies and scene.horizon >= b.H - 4:
                break  # an all-sky scene holds only flyers
            w, h = _scattered_size(b, category, base, flies)
            top = h if flies else min(b.H, max(h, scene.horizon + 2))
            bottom = rng.randint(top, max(top, b.H if flies else b.H))
            color = b.color(category)
            obj = b._make(category, w, h, rng.randint(0, b.W - w), bottom, color=color, pose=pose)
            obj.place = infer_place(category, obj.box, scene.background, scene.horizon, road)
            obj.facing = rng.choice(("left", "right"))
            if b.add(obj, limit):
                placed += 1
                break
    return placed


def _scattered(b: _Builder) -> None:
    """One category in numbers (people: 0 to max_people) at one scale, anywhere, overlapping; a few others."""
    rng, cfg, scene = b.rng, b.config, b.scene
    if 0 < scene.horizon < b.H and rng.random() < 0.6:
        b.sky_dressing(p_sun=0.3, max_clouds=3)
    elif scene.horizon >= b.H:
        b.sky_dressing(p_sun=0.5, max_clouds=4)
    limit = rng.uniform(cfg.max_overlap, min(0.6, 2 * cfg.max_overlap))
    main = rng.choices(SCATTERED_POOL, SCATTERED_WEIGHTS)[0]
    most = cfg.max_people if main == "person" else 15
    n = min(rng.randint(0, most), rng.randint(0, most)) if rng.random() < 0.5 else rng.randint(0, most)
    # one scale per scene (a fraction of the category's near-ground height), log-uniform: dense scenes are smaller
    top_scale = 1.5 if n < 8 else 0.9 if n < 25 else 0.6
    base = math.exp(rng.uniform(math.log(0.12), math.log(top_scale)))
    _scatter(b, main, n, base, limit)
    for category in rng.choices(SCATTERED_POOL, SCATTERED_WEIGHTS, k=rng.randint(0, 4)):
        if category != main:
            _scatter(b, category, 1, math.exp(rng.uniform(math.log(0.15), math.log(1.3))), limit)


_FAMILY_BUILDERS = {
    "crowd": _crowd,
    "dog_frisbee": _dog_frisbee,
    "street": _street,
    "mixed": _mixed,
    "composed": _composed,
    "scattered": _scattered,
}
_FAMILY_BACKGROUND = {"crowd": "park", "dog_frisbee": "park", "street": "street", "mixed": "park"}


def sample_scene(seed: int, config: WorldConfig | None = None, family: str | None = None) -> Scene:
    """A random scene, identical for the same seed and config; `family` forces one family."""
    config = config or WorldConfig()
    rng = random.Random(seed)
    if family is None:
        names = [f for f in FAMILIES if config.family_weights.get(f, 0) > 0]
        family = rng.choices(names, [config.family_weights[f] for f in names])[0]
    elif family not in FAMILIES:
        raise ValueError(f"unknown scene family {family!r}; families are: {', '.join(FAMILIES)}")
    if family == "scattered":
        background = rng.choice(SCATTERED_BACKGROUNDS)
        horizon = round(rng.uniform(0.05, 0.7) * config.height)
    else:
        background = _FAMILY_BACKGROUND.get(family) or rng.choice(COMPOSED_BACKGROUNDS)
        horizon = round(rng.uniform(0.28, 0.45) * config.height)
    if background not in ("park", "street"):
        horizon = default_horizon(background, config.height)
    builder = _Builder(rng, config, family, background, horizon)
    _FAMILY_BUILDERS[family](builder)
    builder.scene.seed = seed
    return builder.scene
