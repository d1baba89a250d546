"""Referring expressions: position words and relations to a landmark, resolved by geometry among detections.

Open-vocabulary detectors (OWL-ViT, Grounding DINO, the in-house one) match what a phrase names, its category
and attributes, far better than where the object stands: 'the rightmost cloud' scores every cloud alike, and
'the frisbee next to the dog' often scores the wrong frisbee. So, as compositional visual systems do, the
grounding tool also searches for the parts of the phrase ('the cloud'; 'the frisbee' and 'the dog') and picks
the box the words name by geometry:

- position among others of its kind: 'leftmost', 'rightmost', 'on the left', 'on the right' (smallest / largest
  centre x); 'topmost', 'highest', 'at the top', 'lowest', 'bottommost', 'at the bottom' (centre y); 'in the
  middle' (the middle one from left to right);
- a relation to a landmark: 'next to', 'beside', 'near' (the nearest box), 'left of', 'right of', 'above',
  'below' (the nearest box on that side).

Every box above the tool's threshold takes part (keeping only those scoring 0.3 of the best or more changed 1
of 906 held-out world expressions, and missed a plain cloud scored 0.26 beside two at 0.9). When the
parts give no answer (no landmark found, nothing on that side), the detections of the whole phrase stand. This
module imports no model code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from toolvlm.tools.imaging import iou

SAME_OBJECT_IOU = 0.5  # a head box this close to the landmark's box is the landmark itself

Box = Sequence[float]
Found = tuple[list[list[float]], list[float]]  # boxes and scores of one searched phrase, best first

_NOT_RELATION = r"(?!\s+(?:side\s+)?of\b)"
_POSITIONS: tuple[tuple[str, str], ...] = (
    ("left", r"\b(?:left-?most|furthest left)\b"),
    ("right", r"\b(?:right-?most|furthest right)\b"),
    ("left", r"\b(?:on|at) the (?:far )?left\b" + _NOT_RELATION),
    ("right", r"\b(?:on|at) the (?:far )?right\b" + _NOT_RELATION),
    ("top", r"\b(?:top-?most|upper-?most|highest)\b"),
    ("bottom", r"\b(?:bottom-?most|lowest)\b"),
    ("top", r"\b(?:at|on) the top\b" + _NOT_RELATION),
    ("bottom", r"\b(?:at|on) the bottom\b" + _NOT_RELATION),
    ("middle", r"\bin the (?:middle|centre|center)\b" + _NOT_RELATION),
)
_RELATIONS: tuple[tuple[str, str], ...] = (
    ("left of", r"\s+(?:(?:to|on) the left of|left of)\s+"),
    ("right of", r"\s+(?:(?:to|on) the right of|right of)\s+"),
    ("next to", r"\s+(?:next to|beside|near|close to)\s+"),
    ("above", r"\s+(?:above)\s+"),
    ("below", r"\s+(?:below|beneath|under)\s+"),
)
_ARTICLES = ("the", "a", "an", "one", "the one")
POSITIONS = ("left", "right", "top", "bottom", "middle")
RELATIONS = tuple(name for name, _ in _RELATIONS)


@dataclass(frozen=True)
class Referring:
    """A phrase split into what to search for, where the object stands among those found, and its landmark."""

    phrase: str
    search: str
    position: str | None = None
    relation: str | None = None
    landmark: str | None = None

    @property
    def composed(self) -> bool:
        """Whether geometry takes part (the phrase has position words or a relation)."""
        return self.position is not None or self.relation is not None

    @property
    def queries(self) -> list[str]:
        """The phrases to detect: the whole phrase, then its parts."""
        return list(dict.fromkeys(p for p in (self.phrase, self.search, self.landmark) if p))


def _tidy(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip(" ,")


def parse(phrase: str) -> Referring:
    """'the rightmost person in a green shirt' -> search 'the person in a green shirt', position 'right'.

    Position words that disagree ('the leftmost bird on the right') leave the phrase whole; so does a phrase that
    is nothing but position words."""
    found: list[tuple[str, re.Match[str]]] = []
    for position, pattern in _POSITIONS:
        found += [(position, m) for m in re.finditer(pattern, phrase, flags=re.IGNORECASE)]
    if len({p for p, _ in found}) > 1:
        return Referring(phrase, phrase)
    rest = phrase
    for _, match in sorted(found, key=lambda pm: -pm[1].start()):
        rest = rest[: match.start()] + " " + rest[match.end() :]
    rest = _tidy(rest)
    position = found[0][0] if found else None
    relation = landmark = None
    for name, pattern in _RELATIONS:
        match = re.search(pattern, rest, flags=re.IGNORECASE)
        if match:
            head, mark = _tidy(rest[: match.start()]), _tidy(rest[match.end() :])
            if head.lower() not in _ARTICLES and mark.lower() not in _ARTICLES and head and mark:
                rest, relation, landmark = head, name, mark
            break
    if not rest or rest.lower() in _ARTICLES:
        return Referring(phrase, phrase)
    return Referring(phrase, rest, position, relation, landmark)


def _gap(a: Box, b: Box) -> float:
    """The distance between two boxes' edges (0 when they touch or overlap)."""
    dx = max(0.0, max(a[0], b[0]) - min(a[2], b[2]))
    dy = max(0.0, max(a[1], b[1]) - min(a[3], b[3]))
    return (dx * dx + dy * dy) ** 0.5


def _centre(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def pick(position: str, boxes: Sequence[Box], candidates: Sequence[int] | None = None) -> int | None:
    """Index of the box `position` names among `candidates` (default: all); None when there are none."""
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; positions are: {', '.join(POSITIONS)}")
    pool = list(range(len(boxes)) if candidates is None else candidates)
    if not pool:
        return None
    cx = {i: _centre(boxes[i])[0] for i in pool}
    cy = {i: _centre(boxes[i])[1] for i in pool}
    choose = {
        "left": lambda: min(pool, key=cx.__getitem__),
        "right": lambda: max(pool, key=cx.__getitem__),
        "top": lambda: min(pool, key=cy.__getitem__),
        "bottom": lambda: max(pool, key=cy.__getitem__),
        "middle": lambda: sorted(pool, key=cx.__getitem__)[len(pool) // 2],
    }
    return choose[position]()


def related(relation: str, boxes: Sequence[Box], landmark: Box, candidates: Sequence[int]) -> list[int]:
    """The candidates in `relation` to the landmark box, nearest first (the landmark itself left out)."""
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; relations are: {', '.join(RELATIONS)}")
    lx, ly = _centre(landmark)
    side = {
        "left of": lambda b: _centre(b)[0] < lx,
        "right of": lambda b: _centre(b)[0] > lx,
        "above": lambda b: _centre(b)[1] < ly,
        "below": lambda b: _centre(b)[1] > ly,
        "next to": lambda b: True,
    }[relation]
    pool = [i for i in candidates if iou(boxes[i], landmark) < SAME_OBJECT_IOU and side(boxes[i])]
    return sorted(pool, key=lambda i: _gap(boxes[i], landmark))


def resolve(ref: Referring, found: Mapping[str, Found]) -> Found | None:
    """The one box a composed phrase names, given the detections of each of `ref.queries` (best first, above
    threshold); None when the phrase is not composed or its parts give no answer (then the whole phrase's stand)."""
    if not ref.composed:
        return None
    boxes, scores = found[ref.search]
    pool = list(range(len(boxes)))
    if ref.relation is not None:
        marks, _ = found[ref.landmark]  # type: ignore[index]
        if not marks:
            return None
        near = related(ref.relation, boxes, marks[0], pool)
        if ref.position is None:
            pool = near[:1]
        else:  # 'the red frisbee next to the dog on the left': the position among those close to the landmark
            reach = max(marks[0][2] - marks[0][0], marks[0][3] - marks[0][1])
            pool = [i for i in near if _gap(boxes[i], marks[0]) <= 0.5 * reach] or near
    chosen = pick(ref.position, boxes, pool) if ref.position is not None else (pool[0] if pool else None)
    if chosen is None:
        return None
    return [list(boxes[chosen])], [scores[chosen]]
