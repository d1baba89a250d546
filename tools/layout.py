"""Layouts for "a similar image": edit a detected layout by requested changes in object counts.

A layout is parallel lists of boxes `[x0, y0, x1, y1]` (pixels of a width x height canvas) and labels. A change
for a label is a factor (2.0, "x2", "double"), an offset ("+3", "3 more") or a target ("=10", "exactly 10"), read
by count_change.py. Removing keeps a seeded random subset; adding places new boxes of the label's median size (or
a default size when the label is absent) at the candidate position, among seeded random ones, that overlaps the
existing boxes least.
Everything is deterministic given the seed. No models, no torch. Counts are capped (count_change.MAX_COUNT).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from statistics import median
from typing import Any

import numpy as np

from toolvlm.tools.count_change import parse_change


@dataclass
class Layout:
    """Boxes and labels on a canvas."""

    width: int
    height: int
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Instances per label."""
        return dict(Counter(self.labels))

    def scaled(self, width: int, height: int) -> Layout:
        """The same layout on a canvas of another size."""
        sx, sy = width / self.width, height / self.height
        boxes = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in self.boxes]
        return Layout(width, height, boxes, list(self.labels))

    def to_dict(self) -> dict[str, Any]:
        """JSON view."""
        return {
            "size": [self.width, self.height],
            "boxes": [[round(c, 1) for c in b] for b in self.boxes],
            "labels": list(self.labels),
        }


def _overlaps(box: list[float], boxes: np.ndarray) -> float:
    """The summed overlap area of `box` with each row of `boxes` (N, 4)."""
    w = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
    h = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
    return float((np.clip(w, 0, None) * np.clip(h, 0, None)).sum())


# Where a new object goes when the layout has none of its kind yet: (width, height) as fractions of the
# canvas's smaller side, and the band of the canvas height its box lies in (people and trees stand on the
# ground below the horizon, the sun and clouds are in the sky). Other labels: a square of 1/6 anywhere.
SHAPE_PRIORS: dict[str, tuple[float, float, float, float]] = {
    "person": (0.06, 0.16, 0.45, 1.0), "tree": (0.2, 0.3, 0.2, 0.75), "dog": (0.12, 0.08, 0.55, 1.0),
    "car": (0.25, 0.12, 0.5, 1.0), "house": (0.22, 0.2, 0.25, 0.7), "bench": (0.14, 0.07, 0.5, 1.0),
    "flower": (0.04, 0.06, 0.55, 1.0), "sun": (0.1, 0.1, 0.0, 0.3), "cloud": (0.2, 0.1, 0.0, 0.35),
}  # fmt: skip


def place_boxes(layout: Layout, label: str, n: int, rng: random.Random, candidates: int = 64) -> None:
    """Add `n` boxes of `label` where they overlap existing boxes least (sized and placed like the label's boxes
    present, else by `SHAPE_PRIORS`)."""
    same = [b for b, lab in zip(layout.boxes, layout.labels, strict=True) if lab == label]
    side = min(layout.width, layout.height)
    band = (0.0, 1.0)
    if same:  # sized like them, in the band of heights they occupy (a crowd grows on its ground, not the sky)
        bw = median(b[2] - b[0] for b in same)
        bh = median(b[3] - b[1] for b in same)
        band = (min(b[1] for b in same) / layout.height, max(b[3] for b in same) / layout.height)
    elif label in SHAPE_PRIORS:
        fw, fh, *band = SHAPE_PRIORS[label]
        bw, bh = fw * side, fh * side
    else:
        bw = bh = side / 6
    bw, bh = min(bw, layout.width), min(bh, layout.height)
    y_low = band[0] * layout.height
    y_high = max(y_low, band[1] * layout.height - bh)
    placed = np.array(layout.boxes, dtype=np.float64).reshape(-1, 4)
    for _ in range(n):
        best, best_cost = None, float("inf")
        for _ in range(candidates):
            x0 = rng.uniform(0, layout.width - bw)
            y0 = rng.uniform(y_low, y_high)
            box = [x0, y0, x0 + bw, y0 + bh]
            cost = _overlaps(box, placed)
            if cost < best_cost:
                best, best_cost = box, cost
                if cost == 0:
                    break
        layout.boxes.append(best)
        layout.labels.append(label)
        placed = np.vstack([placed, best])


def edit_layout(
    layout: Layout, changes: dict[str, float | int | str], seed: int = 0
) -> tuple[Layout, list[str]]:
    """A new layout with the requested counts; the rest is kept. Returns (layout, notes for the model)."""
    rng = random.Random(seed)
    result = Layout(layout.width, layout.height, [list(b) for b in layout.boxes], list(layout.labels))
    notes = []
    for label, change in changes.items():
        current = result.labels.count(label)
        parsed = parse_change(change)
        target = parsed.apply(current)
        if target < current:
            indices = [i for i, lab in enumerate(result.labels) if lab == label]
            drop = set(rng.sample(indices, current - target))
            result.boxes = [b for i, b in enumerate(result.boxes) if i not in drop]
            result.labels = [lab for i, lab in enumerate(result.labels) if i not in drop]
        elif target > current:
            place_boxes(result, label, target - current, rng)
        if parsed.op == "-" and parsed.number > current > 0:
            notes.append(
                f"asked to remove {parsed.number:g} '{label}' but the reference has {current}: all removed"
            )
        if current == 0 and parsed.op == "x":
            notes.append(f"no '{label}' found in the reference, so a factor changes nothing; use '+N' to add")
        elif current == 0 and target == 0:
            notes.append(f"no '{label}' found in the reference")
    return result, notes


def plural(noun: str) -> str:
    """A naive English plural ('person' -> 'people', 'bus' -> 'buses', 'car' -> 'cars')."""
    if noun.endswith("person"):
        return noun[: -len("person")] + "people"
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    return noun + "s"


def layout_prompt(counts: dict[str, int], base: str | None = None) -> str:
    """A text prompt naming the layout's contents (used by backends that cannot take a layout)."""
    parts = [f"{n} {plural(label)}" if n != 1 else f"one {label}" for label, n in counts.items() if n > 0]
    text = ", ".join(parts)
    if base:
        return f"{base}, with {text}" if text else base
    return f"a photo with {text}" if text else "a photo"
