"""Pillow rendering of world scenes: flat cartoon shapes with distinct silhouettes and saturated colours.

Each object is drawn into its own transparent tile the size of its box, facing right (mirrored when it faces
left); the tile is then trimmed to what was drawn and stretched back to the box, so the drawn pixels touch all
four sides of the box: annotations are exact by construction. No anti-aliasing: the same scene always gives the
same pixels. This module knows the look of things, nothing about sampling or words.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from toolvlm.world.scene import COLOURS, Object, Scene, draw_order, road_top

RGB = tuple[int, int, int]

SKY_TOP: RGB = (95, 165, 235)
SKY_LOW: RGB = (175, 215, 248)
GRASS_FAR: RGB = (135, 195, 95)
GRASS_NEAR: RGB = (95, 170, 65)
ROAD: RGB = (105, 105, 112)
SKINS: tuple[RGB, ...] = ((240, 200, 160), (205, 150, 105), (140, 95, 60))
HAIR: RGB = (60, 40, 25)
TROUSERS: RGB = (45, 50, 80)
WOOD: RGB = (150, 95, 45)
TRUNK: RGB = (105, 65, 30)
LEAVES: RGB = (25, 110, 40)
LEAVES_LIGHT: RGB = (45, 140, 50)
GLASS: RGB = (170, 215, 245)
ROOF: RGB = (85, 85, 95)
SUN: RGB = (255, 210, 0)
CLOUD: RGB = (250, 250, 252)


def shade(c: RGB, f: float) -> RGB:
    """A darker (f < 1) or lighter (f > 1, towards white) version of a colour."""
    if f <= 1:
        return (round(c[0] * f), round(c[1] * f), round(c[2] * f))
    t = min(1.0, f - 1)
    return (round(c[0] + (255 - c[0]) * t), round(c[1] + (255 - c[1]) * t), round(c[2] + (255 - c[2]) * t))


def _edge(c: RGB) -> RGB:
    """Outline colour: darker, or mid grey for very dark fills (so black things keep an edge)."""
    return (90, 90, 90) if sum(c) < 150 else shade(c, 0.55)


class _Pen:
    """Draws shapes given in fractions of the tile (0..1), so one drawing serves every size."""

    def __init__(self, draw: ImageDraw.ImageDraw, w: int, h: int):
        self.d, self.w, self.h = draw, w, h
        self.outline = w >= 14 and h >= 14

    def _xy(self, x0: float, y0: float, x1: float, y1: float) -> list[int]:
        a, b = round(x0 * (self.w - 1)), round(y0 * (self.h - 1))
        c, d = round(x1 * (self.w - 1)), round(y1 * (self.h - 1))
        return [a, b, max(a, c), max(b, d)]

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill: RGB, edge: bool = True) -> None:
        out = _edge(fill) if edge and self.outline else None
        self.d.rectangle(self._xy(x0, y0, x1, y1), fill=fill, outline=out)

    def ellipse(self, x0: float, y0: float, x1: float, y1: float, fill: RGB, edge: bool = True) -> None:
        out = _edge(fill) if edge and self.outline else None
        self.d.ellipse(self._xy(x0, y0, x1, y1), fill=fill, outline=out)

    def poly(self, pts: list[tuple[float, float]], fill: RGB, edge: bool = True) -> None:
        out = _edge(fill) if edge and self.outline else None
        self.d.polygon(
            [(round(x * (self.w - 1)), round(y * (self.h - 1))) for x, y in pts], fill=fill, outline=out
        )


def _colour(obj: Object, default: RGB) -> RGB:
    return COLOURS[obj.color] if obj.color else default


def _person(p: _Pen, obj: Object) -> None:
    shirt = _colour(obj, COLOURS["blue"])
    skin = SKINS[(obj.box[0] * 7 + obj.box[1] * 3) % len(SKINS)]
    head = min(0.2, 0.55 * p.w / max(p.h, 1))
    p.rect(0.3, 0.58, 0.48, 1.0, TROUSERS, edge=False)  # legs
    p.rect(0.52, 0.58, 0.7, 1.0, TROUSERS, edge=False)
    p.rect(0.0, head + 0.04, 0.18, 0.5, shirt)  # arms
    p.rect(0.82, head + 0.04, 1.0, 0.5, shirt)
    p.rect(0.14, head + 0.02, 0.86, 0.62, shirt)  # body
    p.ellipse(0.25, 0.0, 0.75, head + 0.04, skin, edge=False)
    p.ellipse(0.25, 0.0, 0.75, head * 0.45, HAIR, edge=False)


def _tree(p: _Pen, obj: Object) -> None:
    p.rect(0.41, 0.5, 0.59, 1.0, TRUNK)
    p.ellipse(0.0, 0.12, 0.6, 0.62, LEAVES)
    p.ellipse(0.4, 0.12, 1.0, 0.62, LEAVES)
    p.ellipse(0.15, 0.0, 0.85, 0.5, LEAVES)
    p.ellipse(0.3, 0.12, 0.55, 0.32, LEAVES_LIGHT, edge=False)
    p.ellipse(0.55, 0.3, 0.75, 0.45, LEAVES_LIGHT, edge=False)


def _dog(p: _Pen, obj: Object) -> None:
    fur = _colour(obj, COLOURS["brown"])
    dark = shade(fur, 0.6) if sum(fur) > 150 else (80, 80, 80)
    if obj.pose == "lying":
        p.poly([(0.0, 0.62), (0.2, 0.72), (0.2, 0.82), (0.0, 0.75)], dark, edge=False)  # tail, flat
        p.ellipse(0.1, 0.45, 0.82, 1.0, fur)  # body
        p.rect(0.62, 0.84, 1.0, 1.0, fur)  # front paws
        p.ellipse(0.62, 0.0, 0.94, 0.62, fur)  # head
        p.ellipse(0.84, 0.22, 1.0, 0.48, fur)  # snout
        p.ellipse(0.62, 0.05, 0.74, 0.45, dark, edge=False)  # ear
        p.ellipse(0.94, 0.24, 1.0, 0.34, (20, 20, 20), edge=False)  # nose
        return
    p.poly([(0.0, 0.02), (0.08, 0.0), (0.22, 0.34), (0.14, 0.42)], dark, edge=False)  # tail, up
    for x in (0.14, 0.28, 0.56, 0.7):
        p.rect(x, 0.55, x + 0.09, 1.0, fur)  # legs
    p.ellipse(0.1, 0.3, 0.82, 0.7, fur)  # body
    p.ellipse(0.66, 0.0, 0.94, 0.44, fur)  # head
    p.ellipse(0.84, 0.16, 1.0, 0.36, fur)  # snout
    p.ellipse(0.66, 0.04, 0.76, 0.38, dark, edge=False)  # ear
    p.ellipse(0.94, 0.17, 1.0, 0.26, (20, 20, 20), edge=False)  # nose


def _frisbee(p: _Pen, obj: Object) -> None:
    c = _colour(obj, COLOURS["red"])
    if obj.place == "in the air":  # tilted disc: the rim shows underneath
        p.ellipse(0.0, 0.2, 1.0, 1.0, shade(c, 0.6), edge=False)
        p.ellipse(0.0, 0.0, 1.0, 0.8, c)
        p.ellipse(0.25, 0.2, 0.75, 0.6, shade(c, 1.25), edge=False)
    else:  # lying flat on the grass
        p.ellipse(0.0, 0.0, 1.0, 1.0, c)
        p.ellipse(0.22, 0.25, 0.78, 0.75, shade(c, 0.75), edge=False)
        p.ellipse(0.32, 0.35, 0.68, 0.65, c, edge=False)


def _ball(p: _Pen, obj: Object) -> None:
    c = _colour(obj, COLOURS["red"])
    p.ellipse(0.0, 0.0, 1.0, 1.0, c)
    seam = (30, 30, 30) if sum(c) > 600 else (245, 245, 245)
    p.d.arc(p._xy(-0.4, 0.1, 0.55, 0.9), 300, 60, fill=seam)
    p.d.arc(p._xy(0.45, 0.1, 1.4, 0.9), 120, 240, fill=seam)
    p.ellipse(0.58, 0.16, 0.78, 0.34, shade(c, 1.5), edge=False)


def _car(p: _Pen, obj: Object) -> None:
    c = _colour(obj, COLOURS["red"])
    p.poly([(0.2, 0.45), (0.3, 0.0), (0.68, 0.0), (0.8, 0.45)], c)  # cabin
    p.poly([(0.27, 0.4), (0.34, 0.08), (0.47, 0.08), (0.47, 0.4)], GLASS, edge=False)
    p.poly([(0.52, 0.4), (0.52, 0.08), (0.64, 0.08), (0.73, 0.4)], GLASS, edge=False)
    p.rect(0.0, 0.4, 1.0, 0.82, c)  # body
    p.rect(0.94, 0.5, 1.0, 0.6, (255, 235, 120), edge=False)  # headlight
    p.ellipse(0.1, 0.6, 0.34, 1.0, (25, 25, 25), edge=False)  # wheels
    p.ellipse(0.66, 0.6, 0.9, 1.0, (25, 25, 25), edge=False)
    p.ellipse(0.17, 0.72, 0.27, 0.88, (170, 170, 170), edge=False)
    p.ellipse(0.73, 0.72, 0.83, 0.88, (170, 170, 170), edge=False)


def _house(p: _Pen, obj: Object) -> None:
    c = _colour(obj, COLOURS["white"])
    p.rect(0.08, 0.42, 0.92, 1.0, c)  # walls
    p.poly([(0.0, 0.46), (0.5, 0.0), (1.0, 0.46)], ROOF)
    p.rect(0.42, 0.68, 0.58, 1.0, WOOD)  # door
    for x in (0.16, 0.68):
        p.rect(x, 0.55, x + 0.16, 0.74, GLASS)


def _bench(p: _Pen, obj: Object) -> None:
    legs = (70, 70, 75)
    p.rect(0.08, 0.55, 0.16, 1.0, legs, edge=False)
    p.rect(0.84, 0.55, 0.92, 1.0, legs, edge=False)
    p.rect(0.1, 0.0, 0.16, 0.55, legs, edge=False)
    p.rect(0.84, 0.0, 0.9, 0.55, legs, edge=False)
    p.rect(0.0, 0.0, 1.0, 0.16, WOOD)  # backrest slats
    p.rect(0.0, 0.24, 1.0, 0.38, WOOD)
    p.rect(0.0, 0.5, 1.0, 0.64, WOOD)  # seat


def _bird(p: _Pen, obj: Object) -> None:
    c = _colour(obj, COLOURS["black"])
    dark = shade(c, 0.65) if sum(c) > 150 else (95, 95, 95)
    beak = (60, 60, 60) if sum(c) > 150 else (250, 200, 60)
    if obj.place == "in the air":  # wings up in a V
        p.poly([(0.0, 0.45), (0.28, 0.5), (0.28, 0.75), (0.0, 0.8)], dark, edge=False)  # tail
        p.ellipse(0.2, 0.45, 0.82, 1.0, c)  # body
        p.poly([(0.35, 0.62), (0.15, 0.0), (0.55, 0.6)], dark)  # far wing
        p.poly([(0.45, 0.62), (0.72, 0.0), (0.65, 0.62)], c)  # near wing
        p.ellipse(0.66, 0.35, 0.9, 0.7, c)  # head
        p.poly([(0.88, 0.45), (1.0, 0.53), (0.88, 0.6)], beak, edge=False)
        return
    p.poly([(0.0, 0.35), (0.25, 0.45), (0.25, 0.6), (0.0, 0.6)], dark, edge=False)  # tail
    p.rect(0.42, 0.75, 0.46, 1.0, beak, edge=False)  # legs
    p.rect(0.56, 0.75, 0.6, 1.0, beak, edge=False)
    p.ellipse(0.15, 0.25, 0.8, 0.82, c)  # body
    p.ellipse(0.25, 0.4, 0.6, 0.65, dark, edge=False)  # folded wing
    p.ellipse(0.6, 0.0, 0.9, 0.4, c)  # head
    p.poly([(0.88, 0.12), (1.0, 0.2), (0.88, 0.28)], beak, edge=False)


def _flower(p: _Pen, obj: Object) -> None:
    c = _colour(obj, COLOURS["red"])
    stem = (30, 120, 35)
    p.rect(0.44, 0.45, 0.56, 1.0, stem, edge=False)
    p.ellipse(0.56, 0.62, 0.95, 0.78, stem, edge=False)  # leaf
    for x0, y0 in ((0.0, 0.12), (0.5, 0.12), (0.25, 0.0), (0.25, 0.28), (0.08, 0.3), (0.42, 0.3)):
        p.ellipse(x0, y0, x0 + 0.5, y0 + 0.3, c)
    p.ellipse(0.33, 0.18, 0.67, 0.38, (120, 70, 20) if obj.color == "yellow" else (250, 210, 40), edge=False)


def _cloud(p: _Pen, obj: Object) -> None:
    p.ellipse(0.0, 0.45, 0.5, 1.0, CLOUD)
    p.ellipse(0.45, 0.4, 1.0, 1.0, CLOUD)
    p.ellipse(0.15, 0.12, 0.6, 0.9, CLOUD)
    p.ellipse(0.4, 0.0, 0.85, 0.85, CLOUD)
    p.rect(0.2, 0.6, 0.8, 1.0, CLOUD, edge=False)


def _sun(p: _Pen, obj: Object) -> None:
    p.ellipse(0.0, 0.0, 1.0, 1.0, SUN, edge=False)
    p.ellipse(0.15, 0.15, 0.85, 0.85, (255, 235, 80), edge=False)


DRAWERS = {
    "person": _person,
    "tree": _tree,
    "dog": _dog,
    "frisbee": _frisbee,
    "ball": _ball,
    "car": _car,
    "house": _house,
    "bench": _bench,
    "bird": _bird,
    "flower": _flower,
    "cloud": _cloud,
    "sun": _sun,
}


def object_tile(obj: Object) -> Image.Image:
    """The object drawn alone as an RGBA tile exactly the size of its box (drawn pixels touch every side)."""
    w, h = obj.width, obj.height
    tile = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    DRAWERS[obj.category](_Pen(ImageDraw.Draw(tile), w, h), obj)
    bbox = tile.getchannel("A").getbbox()
    if bbox is None:  # too small to draw anything: a filled box of the object's colour
        tile.paste((*_colour(obj, (120, 120, 120)), 255), (0, 0, w, h))
    elif bbox != (0, 0, w, h):
        tile = tile.crop(bbox).resize((w, h), Image.Resampling.NEAREST)
    if obj.facing == "left":
        tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return tile


def _gradient(rows: int, width: int, top: RGB, bottom: RGB) -> np.ndarray:
    t = np.linspace(0.0, 1.0, max(rows, 1))[:rows, None]
    col = np.array(top, dtype=np.float64) * (1 - t) + np.array(bottom, dtype=np.float64) * t
    return np.repeat(np.round(col).astype(np.uint8)[:, None, :], width, axis=1)


def background(scene: Scene) -> Image.Image:
    """The empty canvas: sky above the horizon row, grass below, and a road at the bottom of street scenes."""
    w, h, hz = scene.width, scene.height, min(max(scene.horizon, 0), scene.height)
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    pixels[:hz] = _gradient(hz, w, SKY_TOP, SKY_LOW)
    pixels[hz:] = _gradient(h - hz, w, GRASS_FAR, GRASS_NEAR)
    if scene.background == "street":
        top = road_top(scene)
        pixels[top:] = ROAD
        mid, thick = (top + h) // 2, max(1, (h - top) // 20)
        for x in range(0, w, max(8, w // 8)):
            pixels[mid : mid + thick, x : x + max(4, w // 16)] = (240, 240, 240)
    return Image.fromarray(pixels, "RGB")


def render_scene(scene: Scene) -> Image.Image:
    """The scene as an RGB image of its canvas size, painted sky first, then far to near, then the air."""
    image = background(scene)
    for i in draw_order(scene):
        obj = scene.objects[i]
        if obj.width > 0 and obj.height > 0:
            tile = object_tile(obj)
            image.paste(tile, (obj.box[0], obj.box[1]), tile)
    return image
