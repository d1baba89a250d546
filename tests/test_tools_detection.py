"""Grounding and counter tools end to end on tiny random OWLv2, OWL-ViT and Grounding DINO checkpoints."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from toolvlm.tools import MissingWeightsError, build_tools, hf, imaging
from toolvlm.tools.counter import CounterTool
from toolvlm.tools.detectors import Detection, Detector
from toolvlm.tools.grounding import GroundingTool

BACKENDS = [
    ("owlv2", "owlv2"),
    ("owlvit", "owlvit"),
    ("grounding_dino", "grounding_dino"),
    ("inhouse", "owlvit"),
]

pytest_plugins = ["fixtures_tools"]  # fixtures: scene, tiny_models, scene_path


def _inside(box, image) -> bool:
    x0, y0, x1, y1 = box
    return 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height


@pytest.mark.parametrize(("backend", "kind"), BACKENDS)
def test_grounding_backend_end_to_end(scene, tiny_models, backend, kind):
    tool = GroundingTool(backend=backend, model=str(tiny_models(kind)), threshold=0.0)
    image = scene(160, 120)
    out = tool(image=image, phrase="person; tree")
    assert not out.error, out.content
    art = out.artifact
    assert art["count"] == len(art["boxes"]) == len(art["scores"]) == len(art["labels"]) > 0
    assert set(art["labels"]) <= {"person", "tree"}
    assert all(_inside(b, image) for b in art["boxes"])
    assert art["scores"] == sorted(art["scores"], reverse=True)
    assert out.images and out.images[0].size == image.size
    assert "found" in out.content


def test_grounding_threshold_and_max_boxes(scene, tiny_models):
    tool = GroundingTool(backend="owlv2", model=str(tiny_models("owlv2")))
    image = scene()
    none = tool(image=image, phrase="person", threshold=1.0)
    assert not none.error and none.artifact["count"] == 0 and "lower threshold" in none.content
    capped = tool(image=image, phrase="person", threshold=0.0, max_boxes=2)
    assert capped.artifact["count"] == 2


def test_inhouse_refuses_other_architecture(scene, tiny_models):
    tool = GroundingTool(backend="inhouse", model=str(tiny_models("owlv2")))
    with pytest.raises(ValueError, match="owlvit"):
        tool(image=scene(), phrase="person")


def test_grounding_bad_input_is_an_observation(scene, tiny_models, tmp_path):
    tool = GroundingTool(backend="owlvit", model=str(tiny_models("owlvit")))
    image = scene()
    empty = tool(image=image, phrase="  ")
    assert empty.error and "empty" in empty.content
    wrong = tool(image=image, phrase=3)
    assert wrong.error and "phrase" in wrong.content
    missing_file = tool(image=str(tmp_path / "nope.png"), phrase="person")
    assert missing_file.error and "img_0" in missing_file.content
    wrong_image = tool(image=42, phrase="person")
    assert wrong_image.error
    unknown = tool(image=image, phrase="person", colour="red")
    assert unknown.error and "colour" in unknown.content and "phrase" in unknown.content
    tiny = tool(image=Image.new("RGB", (3, 40)), phrase="person")
    assert tiny.error and "too small" in tiny.content
    bad_threshold = tool(image=image, phrase="person", threshold="high")
    assert bad_threshold.error and "threshold" in bad_threshold.content


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "1", "I;16"])
def test_grounding_accepts_any_image_mode(scene, tiny_models, mode):
    tool = GroundingTool(backend="owlvit", model=str(tiny_models("owlvit")), threshold=0.0)
    image = scene(96, 64).convert(mode)
    out = tool(image=image, phrase="person")
    assert not out.error
    assert all(_inside(b, image) for b in out.artifact["boxes"])


def test_huge_image_is_downscaled_and_boxes_mapped_back(scene, tiny_models):
    tool = GroundingTool(backend="owlvit", model=str(tiny_models("owlvit")), threshold=0.0, max_side=64)
    huge = scene(1280, 640)
    big = tool(image=huge, phrase="person")
    small = tool(image=imaging.fit_image(huge, 64)[0], phrase="person")  # what the model saw: 64x32
    assert big.artifact["image_size"] == [1280, 640]
    assert big.artifact["count"] == small.artifact["count"] > 0
    for b, s in zip(big.artifact["boxes"], small.artifact["boxes"], strict=True):
        assert b == pytest.approx([c * 20 for c in s], abs=1.5)  # artifacts round to 0.1 px
    assert all(_inside(b, Image.new("RGB", (1280, 640))) for b in big.artifact["boxes"])


def test_missing_weights_raise_with_instructions(scene, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLVLM_BUNDLE", str(tmp_path))  # a bundle without the in-house weights
    tool = GroundingTool()
    with pytest.raises(MissingWeightsError, match="--profile"):
        tool(image=scene(), phrase="person")


def test_where_weights_are(tmp_path, scene):
    assert hf.model_folder("grounding", "owlv2", "google/owlv2-base-patch16") == "google/owlv2-base-patch16"
    with pytest.raises(MissingWeightsError, match="not found"):
        hf.model_folder("grounding", "inhouse", "org/name", hub_ok=False)
    with pytest.raises(MissingWeightsError, match="needs 'model'"):
        hf.model_folder("grounding", "owlv2", None)
    empty = GroundingTool(backend="owlvit", model=str(tmp_path))  # a folder without a checkpoint
    with pytest.raises(MissingWeightsError, match="holds no checkpoint"):
        empty(image=scene(), phrase="person")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MissingWeightsError, match="cannot load 'owlvit' weights"):
        GroundingTool(backend="owlvit", model=str(tmp_path))(image=scene(), phrase="person")


def test_unknown_backend_lists_known_ones():
    with pytest.raises(ValueError, match="owlv2.*owlvit|grounding_dino"):
        GroundingTool(backend="yolo")


def test_a_second_view_half_a_patch_off_maps_back_to_the_image(scene, tiny_models, tmp_path):
    import json
    import shutil

    import numpy as np

    from toolvlm.tools.detectors import CALIBRATION, make_detector

    image = scene(160, 120)
    one = make_detector("grounding", "inhouse", model=str(tiny_models("owlvit")), views=1)
    two = make_detector("grounding", "inhouse", model=str(tiny_models("owlvit")), views=2)
    one.load()
    two.load()
    boxes, scores, views = two.phrase_scores(image, ["person", "tree"])  # each phrase scored on its own
    assert boxes.shape == (32, 4)  # a 64-px input of 16-px patches: 16 boxes a view
    assert scores.shape == (32, 2)
    assert views.tolist() == [0] * 16 + [1] * 16
    assert np.allclose(boxes[:16], one.phrase_scores(image, ["person", "tree"])[0])
    # the random model's boxes are its grid's prior boxes (centres at the far edge of each patch); the second
    # view's, 160 * 16 / 128 = 20 px and 120 * 16 / 128 = 15 px on and 140x105 px wide, lie between the first's
    xs, ys = np.round((boxes[:, 0] + boxes[:, 2]) / 2), np.round((boxes[:, 1] + boxes[:, 3]) / 2)
    assert sorted(set(xs[:16])) == [40, 80, 120, 160] and sorted(set(ys[:16])) == [30, 60, 90, 120]
    assert sorted(set(xs[16:])) == [55, 90, 125, 160] and sorted(set(ys[16:])) == [41, 68, 94, 120]
    first, both = one.detect(image, ["person", "tree"], 0.0), two.detect(image, ["person", "tree"], 0.0)
    assert [d.box for d in both[: len(first)]] == [d.box for d in first] and len(both) > len(first)
    assert {d.view for d in both[: len(first)]} == {0} and {d.view for d in both[len(first) :]} == {1}
    tool = GroundingTool(backend="inhouse", model=str(tiny_models("owlvit")), threshold=0.0, views=2)
    assert all(_inside(box, image) for box in tool(image=image, phrase="person").artifact["boxes"])  # clipped
    # the number of views ships with the calibrated thresholds; a tool's own setting wins
    shipped = shutil.copytree(tiny_models("owlvit"), tmp_path / "owl")
    (shipped / CALIBRATION).write_text(json.dumps({"count_threshold": 0.3, "views": 2}))
    assert make_detector("counter", "inhouse", model=str(shipped)).n_views == 1  # not loaded yet: one
    loaded = make_detector("counter", "inhouse", model=str(shipped))
    loaded.load()
    assert loaded.n_views == 2 and len(loaded.phrase_scores(image, ["person"])[0]) == 32
    own = make_detector("counter", "inhouse", model=str(shipped), views=1)
    own.load()
    assert own.n_views == 1 and len(own.phrase_scores(image, ["person"])[0]) == 16
    with pytest.raises(ValueError, match="views must be 1 or 2"):
        GroundingTool(backend="inhouse", views=3)


@pytest.mark.parametrize("kind", ["owlv2", "grounding_dino"])
def test_counter_counts_boxes_and_tiles(scene, tiny_models, kind):
    counter = CounterTool(backend=kind, model=str(tiny_models(kind)), threshold=0.0, tile_size=96)
    image = scene(300, 200, people=8)
    out = counter(image=image, phrase="person")
    assert not out.error
    assert out.artifact["count"] == len(out.artifact["boxes"])
    assert out.artifact["tiles"] > 1  # 300 px > 1.5 tiles of 96 px
    assert out.content.startswith(f"about {out.artifact['count']} ")
    assert out.images[0].size == image.size
    untiled = counter(image=image, phrase="person", tiling=False)
    assert untiled.artifact["tiles"] == 1


class ScoredDetector(Detector):
    """Three boxes per phrase, scored 0.9, 0.2 and 0.05; calibrated like shipped weights."""

    backend = "scored"

    def __init__(self, calibration: dict) -> None:
        super().__init__()
        self.model, self.calibration = self, calibration

    def load(self, tool: str = "grounding") -> None:
        """Nothing to load."""

    def detect(self, image, phrases, threshold):
        """Three boxes apart for each phrase, those scoring >= threshold."""
        found = []
        for k, phrase in enumerate(phrases):
            for i, score in enumerate((0.9, 0.2, 0.05)):
                if score >= threshold:
                    found.append(Detection([40.0 * i, 30.0 * k, 40.0 * i + 20, 30.0 * k + 20], score, phrase))
        return found


def test_counter_uses_a_phrase_threshold_the_weights_ship():
    calibration = {"count_threshold": 0.3, "count_thresholds": {"bird": 0.1, "birds": 0.1}}
    detector = ScoredDetector(calibration)
    assert detector.threshold("count", 0.2, "The  Birds") == 0.1
    assert detector.threshold("count", 0.2, "dog") == detector.threshold("count", 0.2) == 0.3
    assert ScoredDetector({}).threshold("count", 0.2, "bird") == 0.2
    counter = CounterTool(backend="owlvit")
    counter.detector = detector
    image = Image.new("RGB", (160, 120))
    assert counter(image=image, phrase="bird").artifact["count"] == 2  # 0.9 and 0.2 >= 0.1
    assert counter(image=image, phrase="dog").artifact["count"] == 1  # 0.9 >= 0.3
    both = counter(image=image, phrase="bird; dog")
    assert both.artifact["per_label"] == {"bird": 2, "dog": 1}
    assert both.artifact["thresholds"] == {"bird": 0.1, "dog": 0.3} and "0.1 for bird" in both.content
    assert counter(image=image, phrase="bird", threshold=0.5).artifact["count"] == 1  # a given one wins


def test_counter_shares_the_grounding_detector(scene, tiny_models):
    tools = build_tools(
        {
            "grounding": {"backend": "owlvit", "model": str(tiny_models("owlvit"))},
            "counter": {"threshold": 0.0},
        }
    )
    assert tools["counter"].detector is tools["grounding"].detector
    out = tools["counter"](image=scene(), phrase="person")
    assert not out.error and out.artifact["count"] > 0


@settings(
    max_examples=8, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    width=st.integers(16, 400),
    height=st.integers(16, 400),
    threshold=st.floats(0.0, 0.6),
    tiling=st.sampled_from([None, True, False]),
)
def test_property_count_equals_boxes_and_boxes_inside(scene, tiny_models, width, height, threshold, tiling):
    counter = CounterTool(backend="owlvit", model=str(tiny_models("owlvit")), tile_size=128)
    image = scene(width, height)
    out = counter(image=image, phrase="person", threshold=threshold, tiling=tiling)
    assert not out.error
    art = out.artifact
    assert art["count"] == len(art["boxes"]) == len(art["scores"])
    assert all(s >= round(threshold, 4) - 1e-4 for s in art["scores"])  # artifacts round scores
    assert all(_inside(b, image) for b in art["boxes"])


def test_counter_can_take_a_box_inside_a_better_one_for_its_part():
    class DogAndHead(ScoredDetector):
        def detect(self, image, phrases, threshold):
            """A dog, its head inside it (IoU 0.25, so plain NMS keeps both), and a second dog."""
            boxes = [([0, 0, 40, 40], 0.9), ([0, 0, 20, 20], 0.6), ([60, 0, 100, 40], 0.8)]
            return [Detection(b, s, phrases[0]) for b, s in boxes if s >= threshold]

    image = Image.new("RGB", (120, 60))
    plain, parts = CounterTool(backend="owlvit"), CounterTool(backend="owlvit", contain=0.7)
    plain.detector = parts.detector = DogAndHead({"count_threshold": 0.5})
    assert plain(image=image, phrase="dog").artifact["count"] == 3
    assert parts(image=image, phrase="dog").artifact["boxes"] == [[0, 0, 40, 40], [60, 0, 100, 40]]
    shipped = CounterTool(backend="owlvit")  # no contain given: the one the weights ship
    shipped.detector = DogAndHead({"count_threshold": 0.5, "count_contain": 0.7})
    assert shipped(image=image, phrase="dog").artifact["count"] == 2
    overridden = CounterTool(backend="owlvit", contain=1.0)
    overridden.detector = shipped.detector
    assert overridden(image=image, phrase="dog").artifact["count"] == 3
