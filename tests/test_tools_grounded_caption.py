"""The grounded captioner: captions written from a detector's findings, thresholds from its calibration."""

from __future__ import annotations

import pytest
from PIL import Image

from toolvlm.tools.captioner import CaptionerTool
from toolvlm.tools.detectors import Detection, Detector
from toolvlm.tools.grounded_caption import GroundedCaptioner, count_words, join_items, plural
from toolvlm.tools.grounding import GroundingTool
from toolvlm.tools.registry import backends, build_tools


class FixedDetector(Detector):
    """Answers every call with the same scored boxes (label = phrase); no weights."""

    backend = "fixed"

    def __init__(self, found: dict[str, list[float]], calibration: dict | None = None) -> None:
        super().__init__()
        self.found = found  # phrase -> scores of its boxes
        self.model = self
        self.calibration = calibration or {}
        self.calls = 0

    def load(self, tool: str = "grounding") -> None:
        """Nothing to load."""

    def detect(self, image: Image.Image, phrases: list[str], threshold: float) -> list[Detection]:
        self.calls += 1
        return [
            Detection([10.0 + 40 * i, 10.0, 40.0 + 40 * i, 50.0], s, p)
            for p in phrases
            for i, s in enumerate(self.found.get(p, []))
            if s >= threshold
        ]


IMAGE = Image.new("RGB", (320, 240), "green")
VOCAB = ["person", "tree", "dog", "cloud", "sun"]


def test_words_for_counts():
    assert [plural(w) for w in ("person", "bench", "tree", "butterfly", "red car")] == [
        "people",
        "benches",
        "trees",
        "butterflies",
        "red cars",
    ]
    assert count_words("tree", 1) == "a tree" and count_words("apple", 1) == "an apple"
    assert count_words("person", 3) == "3 people" and count_words("sun", 2) == "the sun"
    assert join_items(["a"]) == "a" and join_items(["a", "b", "c"]) == "a, b and c"


def test_mentions_only_what_clears_its_describe_threshold_and_counts_at_the_counting_one():
    detector = FixedDetector(
        {"person": [0.9, 0.8, 0.35, 0.2], "tree": [0.6], "dog": [0.45], "cloud": [0.3, 0.3]},
        {"count_threshold": 0.3, "describe_thresholds": {"dog": 0.5, "tree": 0.5}, "describe_threshold": 0.4},
    )
    captioner = GroundedCaptioner(detector, VOCAB)
    # person: best 0.9 >= 0.4, 3 boxes >= 0.3; tree 0.6 >= 0.5; dog 0.45 < its own 0.5; cloud 0.3 < 0.4
    assert captioner.found(IMAGE) == {"person": 3, "tree": 1}
    assert captioner.caption(IMAGE) == "3 people and a tree"


def test_the_tool_shares_the_grounding_detector_and_says_when_nothing_is_found():
    grounding = GroundingTool(backend="inhouse")
    grounding.detector = FixedDetector({"sun": [0.9], "dog": [0.7]})
    tool = CaptionerTool("grounded", grounding=grounding, vocabulary=VOCAB)
    out = tool(image=IMAGE)
    assert not out.error and out.content == "A dog and the sun."
    assert grounding.detector.calls == 1  # one detector pass for the whole vocabulary
    grounding.detector.found = {}
    assert tool(image=IMAGE).content.startswith("the captioner produced no text")


def test_registry_wires_the_grounded_backend_to_the_grounding_detector():
    assert "grounded" in backends("captioner")
    tools = build_tools(
        {
            "grounding": {"backend": "inhouse", "model": "unused"},
            "captioner": {"backend": "grounded", "vocabulary": VOCAB},
        }
    )
    assert tools["captioner"].captioner.detector is tools["grounding"].detector
    with pytest.raises(ValueError, match="vocabulary"):
        GroundedCaptioner(tools["grounding"].detector, [])
    with pytest.raises(ValueError, match="grounded"):
        CaptionerTool("blip", model="x", vocabulary=VOCAB)
