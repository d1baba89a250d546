"""The procedurally drawn world: determinism, exact boxes, coverage, crowds, text consistency, specs and CLI."""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from toolvlm.cli import main
from toolvlm.world import (
    CATEGORIES,
    Scene,
    WorldConfig,
    annotate,
    relations,
    render_scene,
    resolve_expression,
    sample_scene,
    scene_from_spec,
)
from toolvlm.world.draw import background, object_tile
from toolvlm.world.text import RELATIONS, relation_holds

SEEDS = range(300)


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return [sample_scene(s) for s in SEEDS]


def png_bytes(scene: Scene) -> bytes:
    buf = io.BytesIO()
    render_scene(scene).save(buf, format="PNG")
    return buf.getvalue()


def test_same_seed_same_image_and_annotations():
    for seed in (0, 7, 123):
        a, b = sample_scene(seed), sample_scene(seed)
        assert annotate(a) == annotate(b)
        assert png_bytes(a) == png_bytes(b)
    assert annotate(sample_scene(1)) != annotate(sample_scene(2))


def test_boxes_inside_canvas_and_not_degenerate(scenes):
    for scene in scenes:
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= scene.width and 0 <= y0 < y1 <= scene.height, (scene.seed, o)
            assert o.width >= 4 and o.height >= 4, (scene.seed, o)


def test_drawn_pixels_fill_each_box_exactly(scenes):
    for scene in scenes[:60]:
        for o in scene.objects:
            alpha = np.asarray(object_tile(o).getchannel("A"))
            ys, xs = np.nonzero(alpha)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, o.width, o.height), o


def test_lone_object_changes_exactly_its_box():
    spec = {
        "width": 160,
        "height": 120,
        "background": "grass",
        "objects": [{"category": "dog", "box": [30, 40, 97, 90]}],
    }
    scene = scene_from_spec(spec)
    changed = np.any(np.asarray(render_scene(scene)) != np.asarray(background(scene)), axis=2)
    ys, xs = np.nonzero(changed)
    assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [30, 40, 97, 90]


def test_categories_colours_and_families_covered(scenes):
    categories = Counter(o.category for s in scenes for o in s.objects)
    colours = Counter(o.color for s in scenes for o in s.objects if o.color)
    assert set(categories) == set(CATEGORIES) and len(categories) >= 10
    assert len(colours) >= 6
    assert {s.family for s in scenes} == {"crowd", "dog_frisbee", "street", "mixed"}
    places = Counter((o.category, o.place) for s in scenes for o in s.objects)
    for thing in ("frisbee", "ball", "bird"):
        assert places[(thing, "in the air")] and places[(thing, "on the grass")]
    assert Counter(o.pose for s in scenes for o in s.objects if o.category == "dog").keys() == {
        "standing",
        "lying",
    }


def test_crowds_reach_sixty_people_with_perspective(scenes):
    crowds = [s for s in scenes if s.family == "crowd"]
    people = [s.counts()["person"] for s in crowds]
    assert max(people) >= 55 and min(people) >= 8
    full = replace(WorldConfig(), min_people=60, family_weights={"crowd": 1.0})
    assert all(sample_scene(s, full).counts()["person"] == 60 for s in range(5))
    crowd = crowds[people.index(max(people))]
    persons = sorted((o for o in crowd.objects if o.category == "person"), key=lambda o: o.box[3])
    far, near = persons[: len(persons) // 4], persons[-len(persons) // 4 :]
    assert np.mean([o.height for o in far]) < 0.6 * np.mean([o.height for o in near])


def test_composed_family_drops_perspective_and_shows_every_background():
    drawn = {sample_scene(i).family for i in range(200)}
    assert "composed" not in drawn  # no default mix draws it
    world = WorldConfig().with_composed(0.25)
    assert world.family_weights["composed"] == 0.25 and sum(world.family_weights.values()) == pytest.approx(1)
    assert WorldConfig().with_composed(0).family_weights == WorldConfig().family_weights
    with pytest.raises(ValueError, match="share"):
        WorldConfig().with_composed(1.0)
    composed = [sample_scene(i, family="composed") for i in range(200)]
    assert {s.background for s in composed} == {"grass", "park", "street"}
    assert Counter(s.background for s in composed)["grass"] > 60  # half of them, which no other family shows

    def size_follows_row(scenes: list[Scene]) -> float:
        people = [(o.box[3], o.height) for s in scenes for o in s.objects if o.category == "person"]
        return float(np.corrcoef(np.array(people).T)[0, 1])

    # a person's height no longer follows the row of its feet (perspective: 0.97 in the mixed family)
    assert (
        size_follows_row(composed)
        < 0.5
        < 0.9
        < size_follows_row([sample_scene(i, family="mixed") for i in range(100)])
    )
    assert sample_scene(5, world).to_dict() == sample_scene(5, world).to_dict()
    for scene in composed:
        for o in scene.objects:
            assert 0 <= o.box[0] < o.box[2] <= scene.width and 0 <= o.box[1] < o.box[3] <= scene.height
            assert o.place != "in the air" or o.box[3] <= scene.horizon  # flyers up in the sky only
        annotate(scene)  # every composed scene has captions, relations and expressions


def test_scattered_family_spans_counts_scales_grounds_and_overlap():
    assert "scattered" not in {sample_scene(i).family for i in range(200)}  # no default mix draws it
    world = WorldConfig().with_composed(0.15).with_share("scattered", 0.45)
    assert world.family_weights["scattered"] == 0.45 and world.family_weights["composed"] == pytest.approx(
        0.15 * 0.55
    )
    assert sum(world.family_weights.values()) == pytest.approx(1)
    with pytest.raises(ValueError, match="unknown scene family"):
        WorldConfig().with_share("dance", 0.2)
    scattered = [sample_scene(i, family="scattered") for i in range(300)]
    assert {s.background for s in scattered} == {"grass", "park", "street", "sky"}
    people = [annotate(s)["counts"]["person"] for s in scattered]
    assert min(people) == 0 and max(people) >= 45  # from none to dense crowds
    heights = [o.height for s in scattered for o in s.objects if o.category == "person"]
    assert min(heights) <= 14 and max(heights) >= 100  # tiny to large
    cfg = WorldConfig()

    def hidden(s: Scene) -> float:  # the most any object hides of another
        most = 0.0
        for i, a in enumerate(s.objects):
            for b in s.objects[i + 1 :]:
                ix = min(a.box[2], b.box[2]) - max(a.box[0], b.box[0])
                iy = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
                if ix > 0 and iy > 0:
                    most = max(most, ix * iy / min(a.width * a.height, b.width * b.height))
        return most

    overlaps = [hidden(s) for s in scattered]
    assert max(overlaps) > cfg.max_overlap  # more occlusion than the default families allow
    for scene in scattered:
        if scene.background == "sky":
            assert all(o.category in ("bird", "ball", "frisbee", "cloud", "sun") for o in scene.objects)
        for o in scene.objects:
            assert 0 <= o.box[0] < o.box[2] <= scene.width and 0 <= o.box[1] < o.box[3] <= scene.height
        annotate(scene)
    assert sample_scene(7, family="scattered").to_dict() == sample_scene(7, family="scattered").to_dict()


def test_crowd_on_larger_canvas():
    config = replace(WorldConfig(), width=448, height=448, family_weights={"crowd": 1.0})
    scene = sample_scene(3, config)
    assert (scene.width, scene.height) == (448, 448) and scene.counts()["person"] >= 8
    assert render_scene(scene).size == (448, 448)


def test_referring_expressions_pick_exactly_one(scenes):
    seen = 0
    for scene in scenes:
        for ref in annotate(scene)["referring"]:
            assert resolve_expression(scene, ref["expr"]) == [ref["target"]], (scene.seed, ref)
            target = scene.objects[ref["target"]]
            assert ref["box"] == target.box and target.category in ref["text"].replace("people", "person")
            if list(ref["expr"]) in (["category"], ["category", "color"]):  # check plain ones independently
                same = [o for o in scene.objects if o.category == target.category]
                same = [o for o in same if ref["expr"].get("color") in (None, o.color)]
                assert len(same) == 1
            seen += 1
    assert seen > 1000


def test_dog_and_frisbee_expression():
    scenes = [sample_scene(s, family="dog_frisbee") for s in range(40)]
    texts = {r["text"] for s in scenes for r in annotate(s)["referring"]}
    assert "the red frisbee next to the dog" in texts
    captions = [annotate(s)["caption"] for s in scenes]
    assert any(c.startswith("A brown dog lying on the grass next to a red frisbee") for c in captions)


def test_relations_consistent_with_boxes(scenes):
    seen = set()
    for scene in scenes[:100]:
        triples = relations(scene)
        for i, rel, j in triples:
            seen.add(rel)
            a, b = scene.objects[i].box, scene.objects[j].box
            if rel == "left of":
                assert (a[0] + a[2]) < (b[0] + b[2]) and a[2] <= b[2]
            elif rel == "above":
                assert (a[1] + a[3]) < (b[1] + b[3]) and a[3] <= b[3]
            elif rel == "next to":
                assert [j, "next to", i] in triples
            inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
            if rel in inverse:
                assert relation_holds(scene.objects[j], inverse[rel], scene.objects[i])
    assert seen == set(RELATIONS)


def test_captions_mention_counts_and_colours(scenes):
    for scene in scenes[:100]:
        ann = annotate(scene)
        text = (ann["caption"] + " " + ann["paragraph"]).lower()
        for o in scene.objects:
            assert o.category in text.replace("people", "person"), (scene.seed, o.category, text)
            if o.color:  # every colour is named, in crowds too ('about 35 people in black, blue, ... shirts')
                assert o.color in ann["caption"].lower(), (scene.seed, o.color, ann["caption"])
                assert o.color in ann["paragraph"].lower(), (scene.seed, o.color, ann["paragraph"])
        n = ann["counts"]["person"]
        if n > 20:
            said = int(ann["caption"].lower().split("about ")[1].split(" people")[0])
            assert abs(said - n) <= 0.1 * n, (n, ann["caption"])


def test_scene_dict_round_trip(scenes):
    for scene in scenes[:20]:
        again = Scene.from_dict(json.loads(json.dumps(annotate(scene))))
        assert again == scene
        assert scene_from_spec(scene.to_dict()) == scene
    config = WorldConfig(width=448, height=448, max_people=30)
    assert WorldConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


SPEC = {
    "width": 224,
    "height": 224,
    "background": "park",
    "objects": [
        {"category": "tree", "box": [10, 40, 70, 130]},
        {"category": "person", "color": "red", "box": [100, 90, 120, 140]},
        {"category": "person", "color": "blue", "box": [140, 95, 160, 145]},
        {"category": "dog", "color": "brown", "box": [60, 170, 120, 200], "pose": "lying"},
        {"category": "frisbee", "color": "red", "box": [130, 188, 160, 199]},
        {"category": "sun", "box": [180, 10, 210, 40]},
    ],
}


def test_spec_round_trip(tmp_path):
    scene = scene_from_spec(SPEC)
    ann = annotate(scene)
    for given, got in zip(SPEC["objects"], ann["objects"], strict=True):
        assert {k: got[k] for k in given} == given
    assert ann["counts"]["person"] == 2 and ann["objects"][4]["place"] == "on the grass"
    texts = {r["text"]: r["target"] for r in ann["referring"]}
    assert texts["the red frisbee next to the dog"] == 4 and texts["the person in a blue shirt"] == 2
    image = render_scene(scene)
    assert image.size == (224, 224) and image.getpixel((195, 25)) != image.getpixel((5, 5))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"category": "unicorn"}, "unknown category 'unicorn'; categories are: person, tree"),
        ({"color": "teal"}, "unknown colour 'teal'; colours are: red, blue"),
        ({"box": [200, 10, 260, 50]}, "lies outside the 224x224 canvas"),
        ({"box": [50, 50, 40, 60]}, "is empty"),
        ({"box": [1, 2, 3]}, "box must be four numbers"),
        ({"category": "tree", "color": "red"}, "a tree takes no colour"),
        ({"pose": "flying"}, "pose 'flying'"),
    ],
)
def test_bad_spec_errors(change, message):
    spec = {"objects": [{"category": "person", "color": "red", "box": [10, 10, 30, 60], **change}]}
    with pytest.raises(ValueError, match="object 0") as err:
        scene_from_spec(spec)
    assert message in str(err.value)
    with pytest.raises(ValueError, match="unknown background 'moon'; backgrounds are: park"):
        scene_from_spec({"background": "moon", "objects": []})


def test_cli_sample(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["world", "sample", "--n", "3", "--seed", "5", "--out", str(out), "--size", "160"]) == 0
    lines = (out / "annotations.jsonl").read_text().splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert Image.open(out / first["image"]).size == (160, 160)
    assert {"caption", "paragraph", "referring", "relations", "counts", "objects"} <= set(first)
    assert json.loads((out / "world_config.json").read_text())["width"] == 160
    assert "wrote 3 scenes" in capsys.readouterr().out


def test_cli_render(tmp_path, capsys):
    spec_path, png, ann = tmp_path / "scene.json", tmp_path / "out.png", tmp_path / "ann.json"
    spec_path.write_text(json.dumps(SPEC))
    assert main(["world", "render", str(spec_path), str(png), "--annotations", str(ann)]) == 0
    assert Image.open(png).size == (224, 224)
    assert json.loads(ann.read_text())["counts"]["person"] == 2
    assert render_scene(scene_from_spec(SPEC)).tobytes() == Image.open(png).convert("RGB").tobytes()


def test_cli_render_errors(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert main(["world", "render", str(missing), str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("toolvlm world render: error: scene file") and "not found" in err and "\n" not in err
    )
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["world", "render", str(bad), str(tmp_path / "o.png")]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    bad.write_text(json.dumps({"objects": [{"category": "dragon", "box": [0, 0, 5, 5]}]}))
    assert main(["world", "render", str(bad), str(tmp_path / "o.png")]) == 2
    assert "unknown category 'dragon'" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
