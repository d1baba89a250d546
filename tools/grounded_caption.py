"""A captioner that writes what a detector finds: "3 people, a tree, a dog and 2 clouds."

Small captioning models trained on one kind of picture describe what they were trained on, present or not (the
default bundle's BLIP names a sky, a sun and clouds in half the grass-only scenes it sees). An open-vocabulary
detector is much harder to fool: it scores each category of a vocabulary in the image on its own. This backend
of the `captioner` tool asks the detector for every category of its vocabulary at once, mentions a category when
its best box clears the category's *describe* threshold (shipped with the detector's calibration as
`describe_thresholds` / `describe_threshold`, set for few false mentions), and says how many boxes clear the
counting threshold. The caption is grounded by construction: every category it names was found.

It knows detectors and words for counts; not conversations, models of text, or the world that trained them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from PIL import Image

from toolvlm.tools.detectors import Detector
from toolvlm.tools.grounding import locate

log = logging.getLogger(__name__)

DEFAULT_DESCRIBE_THRESHOLD = 0.5
DEFAULT_COUNT_THRESHOLD = 0.3
FLOOR = 0.05  # the lowest score asked of the detector (every threshold is at least this)
IRREGULAR_PLURALS = {"person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice"}
ONE_OF_A_KIND = {"sun", "moon", "sky"}  # "the sun", never "a sun" or "2 suns"


def plural(noun: str) -> str:
    """The plural of a (last) noun: 'person' -> 'people', 'bench' -> 'benches', 'red car' -> 'red cars'."""
    head, _, last = noun.rpartition(" ")
    if last in IRREGULAR_PLURALS:
        word = IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "sh", "ch", "x", "z")):
        word = last + "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def count_words(noun: str, n: int) -> str:
    """'a tree', 'an apple', '3 people', 'the sun'."""
    if noun in ONE_OF_A_KIND:
        return f"the {noun}"
    if n == 1:
        return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
    return f"{n} {plural(noun)}"


def join_items(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


class GroundedCaptioner:
    """Captions from a detector's findings over a fixed vocabulary; the `captioner` tool's `grounded` backend."""

    def __init__(self, detector: Detector, vocabulary: Sequence[str], nms_iou: float = 0.5) -> None:
        if not vocabulary:
            raise ValueError("the grounded captioner needs a vocabulary: the categories it may mention")
        self.detector = detector
        self.vocabulary = list(vocabulary)
        self.nms_iou = nms_iou

    def load(self) -> None:
        """Load the detector (once)."""
        self.detector.load("captioner")

    def thresholds(self) -> tuple[dict[str, float], dict[str, float]]:
        """Per category: (describe threshold, count threshold), as the detector's calibration ships them."""
        describe = {
            c: self.detector.threshold("describe", DEFAULT_DESCRIBE_THRESHOLD, c) for c in self.vocabulary
        }
        count = {c: self.detector.threshold("count", DEFAULT_COUNT_THRESHOLD, c) for c in self.vocabulary}
        return describe, count

    def found(self, image: Image.Image) -> dict[str, int]:
        """How many of each category the image shows, for the categories the detector is sure of."""
        self.load()
        describe, count = self.thresholds()
        floor = max(FLOOR, min([*describe.values(), *count.values()]))
        contain = float(self.detector.calibration.get("count_contain", 1.0))
        located = locate(self.detector, image, self.vocabulary, floor, self.nms_iou, contain=contain)
        best: dict[str, float] = {}
        counted: dict[str, int] = {}
        for score, label in zip(located.scores, located.labels, strict=True):
            best[label] = max(best.get(label, 0.0), score)
            counted[label] = counted.get(label, 0) + (score >= count[label])
        return {c: max(1, counted.get(c, 0)) for c in self.vocabulary if best.get(c, 0.0) >= describe[c]}

    def caption(self, image: Image.Image, max_new_tokens: int | None = None) -> str:
        """'3 people, a tree and 2 clouds.' (empty when nothing of the vocabulary is found)."""
        del max_new_tokens  # the text is not generated
        found = self.found(image)
        ordered = sorted(found, key=lambda c: (-found[c], self.vocabulary.index(c)))
        return join_items([count_words(c, found[c]) for c in ordered])
