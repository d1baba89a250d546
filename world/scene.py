"""The scene model of the procedurally drawn world: categories, colours, objects, scenes, and hand-written specs.

A `Scene` is plain data that round-trips through JSON (`to_dict` / `from_dict`). Boxes are `[x0, y0, x1, y1]` in
pixels, `x1`/`y1` exclusive: an object covers the pixel columns `x0 .. x1 - 1`, and the renderer fills its box
tightly (its drawn pixels touch all four sides). This module knows nothing about pixels (`world_draw`), words
(`world_text`) or random sampling (`world_sample`); it only defines what a scene is and validates specs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

CATEGORIES: tuple[str, ...] = (
    "person",
    "tree",
    "dog",
    "frisbee",
    "ball",
    "car",
    "house",
    "bench",
    "bird",
    "flower",
    "cloud",
    "sun",
)

# Saturated, mutually distinct colours; names are the words used in captions and queries.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (222, 30, 35),
    "blue": (35, 75, 225),
    "green": (20, 150, 45),
    "yellow": (250, 215, 30),
    "white": (248, 248, 248),
    "black": (28, 28, 28),
    "orange": (250, 130, 15),
    "purple": (140, 45, 190),
    "brown": (135, 80, 35),
}

# Categories that take a colour, with the palette the sampler draws from (a spec may use any colour).
# A person's colour is the colour of the shirt. Green stays off small things that lie on the grass.
PALETTES: dict[str, tuple[str, ...]] = {
    "person": ("red", "blue", "green", "yellow", "white", "black", "orange", "purple"),
    "dog": ("brown", "black", "white"),
    "frisbee": ("red", "blue", "yellow", "white", "orange", "purple"),
    "ball": ("red", "blue", "yellow", "white", "orange", "purple", "black"),
    "car": ("red", "blue", "green", "yellow", "white", "black", "orange", "purple"),
    "house": ("red", "blue", "yellow", "white", "orange", "purple"),
    "bird": ("red", "blue", "yellow", "black", "white"),
    "flower": ("red", "blue", "yellow", "white", "orange", "purple"),
}
DEFAULT_COLOUR: dict[str, str] = {
    "person": "blue",
    "dog": "brown",
    "frisbee": "red",
    "ball": "red",
    "car": "red",
    "house": "white",
    "bird": "black",
    "flower": "red",
}

SKY_CATEGORIES: tuple[str, ...] = ("sun", "cloud")
FLYING_CATEGORIES: tuple[str, ...] = ("frisbee", "ball", "bird")
PLACES: tuple[str, ...] = ("on the grass", "in the air", "in the sky", "on the road")
POSES: dict[str, tuple[str, ...]] = {"person": ("standing",), "dog": ("standing", "lying")}
FACINGS: tuple[str, ...] = ("left", "right")
BACKGROUNDS: tuple[str, ...] = ("park", "grass", "sky", "street")
FAMILIES: tuple[str, ...] = ("crowd", "dog_frisbee", "street", "mixed", "composed", "scattered")


@dataclass
class Object:
    """One object of a scene: category, box in pixels, colour (if its category takes one) and attributes."""

    category: str
    box: list[int]
    color: str | None = None
    pose: str | None = None
    place: str | None = None
    facing: str = "right"

    @property
    def width(self) -> int:
        """Box width in pixels."""
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        """Box height in pixels."""
        return self.box[3] - self.box[1]

    @property
    def cx(self) -> float:
        """Horizontal centre of the box."""
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        """Vertical centre of the box."""
        return (self.box[1] + self.box[3]) / 2

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        d = asdict(self)
        d["box"] = [int(v) for v in self.box]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Object:
        """Rebuild from `to_dict` output (extra keys are ignored)."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["box"] = [int(v) for v in kwargs["box"]]
        return cls(**kwargs)


@dataclass
class Scene:
    """A whole scene: canvas, background, horizon row and objects; `family`/`seed` say where it came from."""

    width: int = 224
    height: int = 224
    background: str = "park"
    horizon: int = 90
    objects: list[Object] = field(default_factory=list)
    family: str = "spec"
    seed: int | None = None

    def counts(self) -> dict[str, int]:
        """Objects per category, every category listed (zero when absent)."""
        counts = dict.fromkeys(CATEGORIES, 0)
        for obj in self.objects:
            counts[obj.category] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the scene model only; `world_text.annotate` adds captions and relations)."""
        return {
            "width": self.width,
            "height": self.height,
            "background": self.background,
            "horizon": self.horizon,
            "family": self.family,
            "seed": self.seed,
            "objects": [o.to_dict() for o in self.objects],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        """Rebuild from `to_dict` (or `annotate`) output without validation; use `scene_from_spec` for specs."""
        return cls(
            width=int(d["width"]),
            height=int(d["height"]),
            background=d["background"],
            horizon=int(d["horizon"]),
            objects=[Object.from_dict(o) for o in d["objects"]],
            family=d.get("family", "spec"),
            seed=d.get("seed"),
        )

    def to_json(self) -> str:
        """The scene as one JSON line."""
        return json.dumps(self.to_dict())


def default_horizon(background: str, height: int) -> int:
    """The row where the sky meets the grass for a background (0: all grass; height: all sky)."""
    if background == "grass":
        return 0
    if background == "sky":
        return height
    return round(0.4 * height)


def road_top(scene: Scene) -> int:
    """First row of the road in a street scene (the lower part of the ground); the height when there is none."""
    if scene.background != "street":
        return scene.height
    return scene.horizon + round(0.6 * (scene.height - scene.horizon))


def layer(obj: Object) -> int:
    """Drawing layer: 0 sky (sun, clouds), 1 ground, 2 in the air."""
    if obj.category in SKY_CATEGORIES:
        return 0
    return 2 if obj.place == "in the air" else 1


def draw_order(scene: Scene) -> list[int]:
    """Indices of the objects in painting order: sky, then ground far to near (by bottom row), then the air."""
    return sorted(
        range(len(scene.objects)), key=lambda i: (layer(scene.objects[i]), scene.objects[i].box[3], i)
    )


def _fail(where: str, message: str) -> None:
    raise ValueError(f"{where}: {message}")


def infer_place(category: str, box: list[int], background: str, horizon: int, road: int) -> str | None:
    """Where an object given only by its box is: sky objects in the sky, flyers above the horizon in the air,
    cars low on a street on the road, the rest on the grass."""
    if category in SKY_CATEGORIES:
        return "in the sky"
    if background == "sky":
        return "in the air" if category in FLYING_CATEGORIES else None
    if category in FLYING_CATEGORIES and box[3] <= horizon:
        return "in the air"
    if category == "car" and background == "street" and box[3] > road:
        return "on the road"
    return "on the grass"


def scene_from_spec(spec: dict[str, Any]) -> Scene:
    """Build a validated Scene from a hand-written spec (`width`, `height`, `background`, `objects`, ...)."""
    if not isinstance(spec, dict):
        raise ValueError(f"a scene spec is a JSON object, got {type(spec).__name__}")
    width, height = spec.get("width", 224), spec.get("height", 224)
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool) or not 8 <= value <= 4096:
            _fail("spec", f"{name} must be an integer between 8 and 4096, got {value!r}")
    background = spec.get("background", "park")
    if background not in BACKGROUNDS:
        _fail("spec", f"unknown background {background!r}; backgrounds are: {', '.join(BACKGROUNDS)}")
    horizon = spec.get("horizon", default_horizon(background, height))
    if not isinstance(horizon, int) or not 0 <= horizon <= height:
        _fail("spec", f"horizon must be an integer row between 0 and {height}, got {horizon!r}")
    objects_spec = spec.get("objects", [])
    if not isinstance(objects_spec, list):
        _fail("spec", f"'objects' must be a list, got {type(objects_spec).__name__}")
    scene = Scene(width=width, height=height, background=background, horizon=horizon)
    scene.family = spec.get("family", "spec")
    scene.seed = spec.get("seed")
    road = road_top(scene)
    for k, o in enumerate(objects_spec):
        where = f"object {k}"
        if not isinstance(o, dict):
            _fail(where, f"must be a JSON object, got {type(o).__name__}")
        category = o.get("category")
        if category not in CATEGORIES:
            _fail(where, f"unknown category {category!r}; categories are: {', '.join(CATEGORIES)}")
        where = f"object {k} ({category})"
        color = o.get("color", o.get("colour"))
        if category in PALETTES:
            color = DEFAULT_COLOUR[category] if color is None else color
            if color not in COLOURS:
                _fail(where, f"unknown colour {color!r}; colours are: {', '.join(COLOURS)}")
        elif color is not None:
            _fail(where, f"a {category} takes no colour; categories with a colour: {', '.join(PALETTES)}")
        box = o.get("box")
        if (
            not isinstance(box, list | tuple)
            or len(box) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)
        ):
            _fail(where, f"box must be four numbers [x0, y0, x1, y1], got {box!r}")
        box = [round(v) for v in box]
        if box[2] <= box[0] or box[3] <= box[1]:
            _fail(where, f"box {box} is empty: need x1 > x0 and y1 > y0")
        if box[0] < 0 or box[1] < 0 or box[2] > width or box[3] > height:
            _fail(where, f"box {box} lies outside the {width}x{height} canvas")
        pose = o.get("pose", POSES.get(category, (None,))[0])
        if pose not in POSES.get(category, (None,)):
            _fail(where, f"pose {pose!r} does not fit; poses for a {category}: {POSES.get(category, 'none')}")
        place = o.get("place") or infer_place(category, box, background, horizon, road)
        if place is not None and place not in PLACES:
            _fail(where, f"unknown place {place!r}; places are: {', '.join(PLACES)}")
        facing = o.get("facing", "right")
        if facing not in FACINGS:
            _fail(where, f"facing must be one of {FACINGS}, got {facing!r}")
        scene.objects.append(Object(category, box, color, pose, place, facing))
    return scene


@dataclass
class WorldConfig:
    """How scenes are drawn: canvas size, crowd size, family mix, overlap allowed; round-trips to JSON."""

    width: int = 224
    height: int = 224
    max_people: int = 60
    min_people: int = 8
    family_weights: dict[str, float] = field(
        default_factory=lambda: {"crowd": 0.3, "dog_frisbee": 0.25, "street": 0.2, "mixed": 0.25}
    )
    # an object may hide at most this fraction of the box of an object painted before it
    max_overlap: float = 0.3

    def __post_init__(self) -> None:
        unknown = set(self.family_weights) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown scene families {sorted(unknown)}; families are: {', '.join(FAMILIES)}")
        if not any(w > 0 for w in self.family_weights.values()):
            raise ValueError("family_weights must give some family a positive weight")
        if not 1 <= self.min_people <= self.max_people:
            raise ValueError(f"need 1 <= min_people <= max_people, got {self.min_people}, {self.max_people}")

    def with_composed(self, share: float) -> WorldConfig:
        """This world with `share` of its scenes drawn from the composed family, the others' weights scaled."""
        return self.with_share("composed", share)

    def with_share(self, family: str, share: float) -> WorldConfig:
        """This world with `share` of its scenes drawn from `family`, the other families' weights scaled."""
        if family not in FAMILIES:
            raise ValueError(f"unknown scene family {family!r}; families are: {', '.join(FAMILIES)}")
        if not 0 <= share < 1:
            raise ValueError(f"the {family} family's share must be in [0, 1), got {share}")
        total = sum(w for f, w in self.family_weights.items() if f != family)
        weights = {f: w * (1 - share) / total for f, w in self.family_weights.items() if f != family}
        return replace(self, family_weights={**weights, family: share} if share else weights)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorldConfig:
        """Rebuild from `to_dict`; unknown keys raise, naming the known ones."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown WorldConfig keys {unknown}; keys are: {', '.join(names)}")
        return cls(**d)
