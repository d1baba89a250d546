"""Referring expressions: position words and landmarks parsed, and resolved by geometry in the grounding tool."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from toolvlm.tools import referring
from toolvlm.tools.detectors import Detection, Detector
from toolvlm.tools.grounding import GroundingTool


@pytest.mark.parametrize(
    ("phrase", "search", "position", "relation", "landmark"),
    [
        ("the rightmost cloud", "the cloud", "right", None, None),
        ("the leftmost person in a white shirt", "the person in a white shirt", "left", None, None),
        ("the orange flower on the right", "the orange flower", "right", None, None),
        ("the highest bird", "the bird", "top", None, None),
        ("the person in the middle", "the person", "middle", None, None),
        ("the red frisbee next to the dog", "the red frisbee", None, "next to", "the dog"),
        ("the tree to the left of the house", "the tree", None, "left of", "the house"),
        ("the bird on the left of the tree", "the bird", None, "left of", "the tree"),
        ("the ball below the bird", "the ball", None, "below", "the bird"),
        ("the red frisbee next to the dog on the left", "the red frisbee", "left", "next to", "the dog"),
    ],
)
def test_parse_splits_position_words_and_landmarks(phrase, search, position, relation, landmark):
    ref = referring.parse(phrase)
    assert (ref.search, ref.position, ref.relation, ref.landmark) == (search, position, relation, landmark)
    assert ref.composed
    assert ref.queries[0] == phrase  # the whole phrase is always searched too


@pytest.mark.parametrize(
    "phrase",
    [
        "the dog",
        "the person in a blue shirt",
        "the left",
        "the leftmost bird on the right",
        "a car by the road",
    ],
)
def test_parse_leaves_plain_or_contradictory_phrases_whole(phrase):
    ref = referring.parse(phrase)
    assert not ref.composed
    assert ref.search == phrase and ref.queries == [phrase]


def test_pick_and_related_use_box_geometry():
    boxes = [[100, 10, 120, 30], [10, 50, 30, 70], [200, 5, 220, 25], [150, 90, 170, 110]]
    assert referring.pick("left", boxes) == 1
    assert referring.pick("right", boxes) == 2
    assert referring.pick("top", boxes) == 2
    assert referring.pick("bottom", boxes) == 3
    assert referring.pick("middle", boxes) == 3  # x order 1, 0, 3, 2
    assert referring.pick("right", boxes, [0, 1]) == 0
    assert referring.pick("left", boxes, []) is None
    landmark = [125, 10, 145, 30]
    assert referring.related("next to", boxes, landmark, range(4)) == [0, 2, 3, 1]  # edge gaps 0, 55, 60, 97
    assert referring.related("left of", boxes, landmark, range(4)) == [0, 1]
    assert referring.related("below", boxes, landmark, range(4)) == [3, 1]
    assert referring.related("next to", boxes + [landmark], landmark, range(5))[-1] != 4  # not itself
    with pytest.raises(ValueError, match="positions are"):
        referring.pick("north", boxes)


def test_resolve_takes_every_box_found_and_falls_back_to_the_whole_phrase():
    ref = referring.parse("the rightmost cloud")
    clouds = [[10, 5, 40, 20], [60, 5, 90, 20], [150, 5, 180, 20]]
    found = {"the rightmost cloud": ([clouds[0]], [0.9]), "the cloud": (clouds, [0.9, 0.8, 0.2])}
    assert referring.resolve(ref, found) == ([clouds[2]], [0.2])  # above the tool's threshold: a cloud
    assert referring.resolve(ref, {**found, "the cloud": ([], [])}) is None
    assert referring.resolve(referring.parse("the cloud"), found) is None
    near = referring.parse("the frisbee next to the dog")
    frisbees = [[10, 100, 30, 110], [150, 100, 170, 110]]
    found = {
        near.phrase: ([], []),
        "the frisbee": (frisbees, [0.9, 0.85]),
        "the dog": ([[120, 80, 145, 110]], [0.9]),
    }
    assert referring.resolve(near, found) == ([frisbees[1]], [0.85])
    assert referring.resolve(near, {**found, "the dog": ([], [])}) is None  # no landmark: the whole phrase


class BlindDetector(Detector):
    """Finds every object whose category the phrase mentions first, scored left to right best (blind to position
    words, as open-vocabulary detectors are); like OWL-ViT's post-processing, a box answers one phrase per call."""

    backend = "blind"

    def __init__(self, objects: list[tuple[str, list[float]]]) -> None:
        super().__init__()
        self.objects = objects
        self.model = self
        self.calls: list[list[str]] = []

    def load(self, tool: str = "grounding") -> None:
        """Nothing to load."""

    def detect(self, image: Image.Image, phrases: list[str], threshold: float) -> list[Detection]:
        """Boxes of the first category each phrase names; a box already given to a phrase is not given again."""
        self.calls.append(list(phrases))
        found, taken = [], set()
        for phrase in phrases:
            named = [c for c in re.findall(r"[a-z]+", phrase) if c in {c for c, _ in self.objects}]
            if not named:
                continue
            mine = sorted((b for c, b in self.objects if c == named[0]), key=lambda b: b[0])
            for rank, box in enumerate(mine):
                if tuple(box) not in taken:
                    taken.add(tuple(box))
                    found.append(Detection(box, 0.9 - 0.1 * rank, phrase))
        return found


def test_grounding_tool_resolves_position_and_landmark_by_geometry():
    objects = [
        ("cloud", [10.0, 5.0, 40.0, 20.0]),
        ("cloud", [80.0, 5.0, 110.0, 20.0]),
        ("cloud", [160.0, 8.0, 190.0, 22.0]),
        ("dog", [130.0, 90.0, 160.0, 110.0]),
        ("frisbee", [20.0, 100.0, 35.0, 106.0]),
        ("frisbee", [165.0, 102.0, 180.0, 108.0]),
    ]
    detector = BlindDetector(objects)
    tool = GroundingTool(threshold=0.1)
    tool.detector = detector
    image = Image.new("RGB", (200, 120), "green")
    out = tool(image=image, phrase="the rightmost cloud")
    assert out.artifact["boxes"] == [[160, 8, 190, 22]]
    assert out.artifact["resolved"][0]["by"] == "geometry" and out.artifact["resolved"][0]["candidates"] == 3
    assert "the rightmost cloud [160, 8, 190, 22]" in out.content
    assert tool(image=image, phrase="the cloud on the left").artifact["boxes"] == [[10, 5, 40, 20]]
    assert tool(image=image, phrase="the frisbee next to the dog").artifact["boxes"] == [[165, 102, 180, 108]]
    assert detector.calls[-3:] == [
        ["the frisbee next to the dog"],
        ["the frisbee"],
        ["the dog"],
    ]  # one per call
    plain = tool(image=image, phrase="the cloud")
    assert len(plain.artifact["boxes"]) == 3 and "resolved" not in plain.artifact
    tool(image=image, phrase="the cloud; the dog")
    assert detector.calls[-1] == ["the cloud", "the dog"]  # plain phrases: one call, as before
    both = tool(image=image, phrase="the leftmost cloud; the dog")
    assert sorted(both.artifact["labels"]) == ["the dog", "the leftmost cloud"]


def test_geometry_off_searches_the_whole_phrase_only():
    detector = BlindDetector([("cloud", [10.0, 5.0, 40.0, 20.0]), ("cloud", [160.0, 8.0, 190.0, 22.0])])
    tool = GroundingTool(threshold=0.1, geometry=False)
    tool.detector = detector
    out = tool(image=Image.new("RGB", (200, 120)), phrase="the rightmost cloud")
    assert detector.calls == [["the rightmost cloud"]]
    assert len(out.artifact["boxes"]) == 2 and "resolved" not in out.artifact


def test_a_profile_turns_geometry_off():
    from toolvlm.tools import build_tools

    off = build_tools({"grounding": {"backend": "inhouse", "geometry": False}})["grounding"]
    assert off.geometry is False
    assert build_tools({"grounding": {"backend": "inhouse"}})["grounding"].geometry is True
