"""World-model data: seed splits, targets, the open-vocabulary tokenizer, and the eval metrics' pieces."""

from __future__ import annotations

import json
import random

import pytest

from toolvlm.evaluation.world_models import average_precision, caption_items, f1, scene_items
from toolvlm.finetune.world_data import (
    EVAL_SEED_BASE,
    WorldScenes,
    detection_target,
    presence_text,
    scene_seed,
    text_matches,
)
from toolvlm.finetune.world_tokenizer import build_tokenizer
from toolvlm.world import annotate, sample_scene, scene_from_spec


def test_train_and_eval_seeds_are_disjoint():
    assert scene_seed("train", 5) == 5
    assert scene_seed("eval", 5) == EVAL_SEED_BASE + 5
    with pytest.raises(ValueError, match="splits are"):
        scene_seed("test", 0)
    with pytest.raises(ValueError):
        scene_seed("train", EVAL_SEED_BASE)


def test_dataset_items_are_deterministic_tensors():
    data = WorldScenes("eval", length=2, image_size=32)
    a, b = data[1], data[1]
    assert a["pixels"].shape == (3, 32, 32)
    assert (a["pixels"] == b["pixels"]).all()
    assert a["ann"]["caption"] == b["ann"]["caption"]


def test_detection_target_positives_follow_the_phrases():
    ann = annotate(sample_scene(scene_seed("train", 3), family="dog_frisbee"))
    t = detection_target(ann, random.Random(0))
    assert len(t.boxes) == len(ann["objects"]) == len(t.positives)
    for pos in t.positives:
        assert pos, "every object answers at least its category"
        for q in pos:
            assert t.kinds[q] != "negative"
    for q, kind in enumerate(t.kinds):
        if kind == "negative":
            assert not any(q in pos for pos in t.positives)
    assert all(0 <= v <= 1 for box in t.boxes for v in box[:2])


def test_hard_negatives_name_present_categories_in_colours_they_lack_here():
    from toolvlm.world.text import describe

    ann = annotate(sample_scene(scene_seed("train", 3), family="dog_frisbee"))
    shown = {describe(o["category"], o["color"]) for o in ann["objects"] if o.get("color")}
    present = {o["category"] for o in ann["objects"]}
    plain = detection_target(ann, random.Random(0), negatives=0)
    hard = detection_target(ann, random.Random(0), negatives=0, hard_negatives=3)
    assert plain.phrases == hard.phrases[: len(plain.phrases)]  # the same queries, then the hard ones
    extra = hard.phrases[len(plain.phrases) :]
    assert len(extra) == 3 and set(hard.kinds[len(plain.phrases) :]) == {"negative"}
    for phrase in extra:
        assert phrase not in shown
        assert any(phrase.startswith(c) or phrase.endswith(c) for c in present), phrase
    assert not any(q >= len(plain.phrases) for pos in hard.positives for q in pos)


def test_detection_target_without_known_colours_asks_only_categories():
    from toolvlm.world import CATEGORIES
    from toolvlm.world.text import plural

    ann = annotate(sample_scene(scene_seed("train", 3), family="dog_frisbee"))
    t = detection_target(ann, random.Random(0), negatives=4, colours_known=False)
    words = set(CATEGORIES) | {plural(c) for c in CATEGORIES}
    assert set(t.kinds) == {"category", "negative"} and set(t.phrases) <= words
    assert t.kinds.count("negative") == 4  # all four negatives are absent categories
    assert t.kinds.count("category") == len({o["category"] for o in ann["objects"]})
    assert all(pos for pos in t.positives)


def test_presence_statements_match_scenes():
    scene = scene_from_spec({"objects": [{"category": "dog", "box": [10, 150, 60, 190]}]})
    ann = annotate(scene)
    assert text_matches(ann, ("dog", True), own=False)
    assert not text_matches(ann, ("car", True), own=False)
    assert text_matches(ann, ("car", False), own=False)
    assert presence_text("apple", True) == "a photo with an apple"
    assert presence_text("person", False) == "a photo with no people"


def test_tokenizer_is_open_vocabulary_and_short_on_world_text():
    tok = build_tokenizer(max_length=32, n_scenes=20)
    ids = tok("the red frisbee next to the dog")["input_ids"]
    assert len(ids) == 2 + 7  # BOS, one token per world word, EOS
    assert ids[0] > 0  # OWL-ViT's query mask needs BOS > 0
    unseen = "a zebra on a xylophone"
    assert tok.decode(tok(unseen)["input_ids"], skip_special_tokens=True) == unseen


def test_caption_items_and_f1():
    items = caption_items(
        "Five people in red and blue shirts next to a red frisbee and two trees under a sunny sky."
    )
    assert {
        ("person",),
        ("person", "red"),
        ("person", "blue"),
        ("frisbee",),
        ("frisbee", "red"),
        ("tree",),
        ("sun",),
    } <= items
    # the colour list ends at the next object: the white belongs to the house, not to the cars
    items = caption_items(
        "Two cars in orange and yellow and a white house by a road. A person in a red shirt."
    )
    assert {("car", "orange"), ("car", "yellow"), ("house", "white"), ("person", "red")} <= items
    assert ("car", "white") not in items
    scene = scene_from_spec({"objects": [{"category": "frisbee", "color": "red", "box": [10, 150, 40, 160]}]})
    assert f1(caption_items("a red frisbee"), scene_items(scene)) == 1.0
    assert f1(caption_items("a blue car"), scene_items(scene)) == 0.0


def test_average_precision():
    gts = {0: [[0, 0, 10, 10]], 1: [[0, 0, 10, 10]]}
    assert average_precision([(0.9, 0, [0, 0, 10, 10]), (0.8, 1, [0, 0, 10, 10])], gts) == pytest.approx(1.0)
    assert average_precision([(0.9, 0, [50, 50, 60, 60])], gts) == 0.0
    half = average_precision([(0.9, 0, [50, 50, 60, 60]), (0.8, 1, [0, 0, 10, 10])], gts)
    assert 0 < half < 1


def test_lowres_augmentation_blurs_a_deterministic_share():
    import numpy as np

    from toolvlm.finetune.world_data import WorldScenes

    sharp = WorldScenes("train", length=40)
    mixed = WorldScenes("train", length=40, p_lowres=0.5, lowres=64)
    changed = [
        not np.array_equal(np.asarray(sharp[i]["image"]), np.asarray(mixed[i]["image"])) for i in range(40)
    ]
    assert 8 <= sum(changed) <= 32
    again = WorldScenes("train", length=40, p_lowres=0.5, lowres=64)
    assert all(np.array_equal(np.asarray(mixed[i]["image"]), np.asarray(again[i]["image"])) for i in range(5))
    assert mixed[0]["image"].size == sharp[0]["image"].size


def test_count_threshold_calibration_picks_the_separating_band():
    import numpy as np

    from toolvlm.evaluation.calibrate_detector import best_threshold

    rng = np.random.default_rng(0)
    samples = []
    for truth in (1, 3, 7, 12, 45):  # true boxes score 0.6-0.9, spurious ones 0.05-0.3
        scores = np.concatenate([rng.uniform(0.6, 0.9, truth), rng.uniform(0.05, 0.3, 5)])
        samples.append((truth, scores.astype(np.float32)))
    threshold, rate = best_threshold(samples)
    assert rate == 1.0 and 0.3 < threshold < 0.6


def test_calibration_keeps_the_containment_nms_that_counts_best(tmp_path, monkeypatch):
    import numpy as np

    from toolvlm.cli import main
    from toolvlm.evaluation import calibrate_detector
    from toolvlm.tools.counter import CounterTool
    from toolvlm.tools.detectors import CALIBRATION

    def collect(counter, n):
        """Dogs at 0.9, each found with its head (0.3, but 0.95 in the last scene) unless containment NMS
        (<= 0.8) drops the heads: no threshold counts every scene right without it."""
        dropped = counter.contain <= 0.8
        heads = {1: 0.3, 2: 0.3, 3: 0.95}
        return [
            ("dog", t, np.array([0.9] * t + ([] if dropped else [heads[t]] * t), np.float32)) for t in heads
        ]

    monkeypatch.setattr(calibrate_detector, "collect", collect)
    monkeypatch.setattr(CounterTool, "setup", lambda self: None)
    assert main(["train", "calibrate-detector", f"detector={tmp_path}", "contain=[1,0.8,0.6]"]) == 0
    written = json.loads((tmp_path / CALIBRATION).read_text())
    assert written["count_contain"] == 0.8 and written["calibration_count_accuracy"] == 1.0
    # grounding keeps the threshold found without containment
    assert written["count_threshold"] < 0.5 < written["grounding_threshold"] < 0.9
    assert main(["train", "calibrate-detector", f"detector={tmp_path}"]) == 0  # off unless asked for
    assert json.loads((tmp_path / CALIBRATION).read_text())["count_contain"] == 1.0
    assert main(["train", "calibrate-detector", f"detector={tmp_path}", "grounding_threshold=0.2"]) == 0
    written = json.loads((tmp_path / CALIBRATION).read_text())
    assert written["grounding_threshold"] == 0.2 and written["count_threshold"] > 0.5  # counting's own kept
    assert written["views"] == 1
    assert written["view_iou"] is None

    def collect_views(counter, n):
        """A dog seen in two views (only a view IoU of 0.3 or less merges its two boxes) and two dogs, the second
        at 0.8: unmerged, no threshold counts both scenes right."""
        merged = counter.detector.view_iou <= 0.3
        seen = np.array([0.9] if merged else [0.9, 0.85], np.float32)
        return [("dog", 1, seen), ("dog", 2, np.array([0.88, 0.8], np.float32))]

    monkeypatch.setattr(calibrate_detector, "collect", collect_views)
    assert (
        main(["train", "calibrate-detector", f"detector={tmp_path}", "views=2", "view_iou=[0.5,0.3,0.2]"])
        == 0
    )
    written = json.loads((tmp_path / CALIBRATION).read_text())  # counted as the tools will count
    assert (
        written["views"] == 2 and written["view_iou"] == 0.3 and written["calibration_count_accuracy"] == 1.0
    )


def test_categories_scored_lower_get_their_own_count_threshold():
    import numpy as np

    from toolvlm.evaluation.calibrate_detector import best_threshold, own_thresholds

    rng = np.random.default_rng(0)
    samples = []
    for k in range(40):  # dogs: true boxes 0.6-0.9, spurious 0.3-0.4; birds: true 0.15-0.25, spurious < 0.1
        truth = 1 + k % 4
        dog = np.concatenate([rng.uniform(0.6, 0.9, truth), rng.uniform(0.3, 0.4, 2)])
        bird = np.concatenate([rng.uniform(0.15, 0.25, truth), rng.uniform(0.0, 0.1, 2)])
        samples += [("dog", truth, dog.astype(np.float32)), ("bird", truth, bird.astype(np.float32))]
    samples += [("tree", 1, np.array([0.9], dtype=np.float32))] * 5  # too few for a threshold of its own
    shared, _ = best_threshold([(t, s) for _, t, s in samples])
    own = own_thresholds(samples, shared, min_samples=30, min_gain=2)
    assert set(own) == {"bird", "birds"} | ({"dog", "dogs"} if "dog" in own else set())
    assert 0.1 < own["bird"] < 0.15 and own["birds"] == own["bird"]
    assert own_thresholds(samples, shared, min_samples=50, min_gain=2) == {}


def test_all_negatives_asks_every_absent_phrase_once():
    from toolvlm.finetune.world_data import colour_phrases
    from toolvlm.world import CATEGORIES
    from toolvlm.world.text import describe

    ann = annotate(sample_scene(scene_seed("train", 3), family="dog_frisbee"))
    present = {o["category"] for o in ann["objects"]}
    t = detection_target(ann, random.Random(0), negatives=2, hard_negatives=3, all_negatives=True)
    negatives = [p for p, kind in zip(t.phrases, t.kinds, strict=True) if kind == "negative"]
    assert len(negatives) == len(set(negatives))
    assert set(CATEGORIES) - present <= set(negatives)
    shown = {describe(o["category"], o["color"]) for o in ann["objects"] if o.get("color")}
    absent_colours = set(colour_phrases()) - shown
    assert set(negatives) == (set(CATEGORIES) - present) | absent_colours
    assert not any(q in pos for pos in t.positives for q, k in enumerate(t.kinds) if k == "negative")
    blind = detection_target(ann, random.Random(0), all_negatives=True, colours_known=False)
    assert {p for p, k in zip(blind.phrases, blind.kinds, strict=True) if k == "negative"} == set(
        CATEGORIES
    ) - present
