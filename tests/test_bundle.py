"""The shipped default bundle: its profile names parts that are there, it fits the budget, and (slow) the demo
gives the right box and count on the bundled crowd scene."""

from __future__ import annotations

import json

import pytest

from toolvlm import bundle
from toolvlm.agent.profiles import default_profile

BUDGET_MB = 80

pytestmark = pytest.mark.skipif(not bundle.has("controller"), reason="the default bundle is not built")


def test_bundle_profile_names_present_parts_and_fits_the_budget():
    folder = bundle.bundle_dir()
    profile = default_profile()
    assert profile.controller["backend"] == "local"
    assert (folder / "controller" / "adapter_model.safetensors").is_file()
    assert (folder / "controller" / "base.json").is_file()
    for spec in profile.tools.values():
        if "model" in spec:
            assert bundle.has(spec["model"].rsplit("/", 1)[-1]), spec
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert size < BUDGET_MB * 2**20


@pytest.mark.slow
@pytest.mark.smollm2
def test_demo_on_the_bundle_boxes_the_tree_and_counts_the_people(tmp_path, capsys):
    from toolvlm.cli import main
    from toolvlm.evaluation.world_models import iou

    assert main(["demo", "--out", str(tmp_path)]) == 0
    truth = json.loads((tmp_path / "crowd_annotations.json").read_text())
    steps = [
        json.loads(line) for line in (tmp_path / "session" / "trajectory.jsonl").read_text().splitlines()
    ]
    tools = [s for s in steps if s["kind"] == "tool"]
    boxes = next(s["artifact"]["boxes"] for s in tools if s["name"] == "grounding")
    tree = next(o["box"] for o in truth["objects"] if o["category"] == "tree")
    assert boxes and iou(boxes[0], tree) >= 0.5
    count = next(s["artifact"]["count"] for s in tools if s["name"] == "counter")
    people = truth["counts"]["person"]
    assert abs(count - people) <= 0.1 * people


def test_bundle_grounding_resolves_positions_and_landmarks_on_a_composed_scene():
    from toolvlm.evaluation.world_models import iou
    from toolvlm.tools import build_tools
    from toolvlm.world import render_scene, scene_from_spec

    objects = [
        {"category": "cloud", "box": [10, 10, 60, 35]},
        {"category": "cloud", "box": [85, 15, 135, 40]},
        {"category": "cloud", "box": [160, 8, 210, 33]},
        {"category": "dog", "color": "brown", "box": [130, 150, 180, 185]},
        {"category": "frisbee", "color": "red", "box": [185, 172, 207, 180]},
        {"category": "frisbee", "color": "red", "box": [20, 172, 42, 180]},
        {"category": "tree", "box": [60, 70, 110, 160]},
    ]
    image = render_scene(scene_from_spec({"objects": objects}))
    tools = build_tools({"grounding": {"backend": "inhouse", "model": str(bundle.part("detector"))}})
    for phrase, want in [
        ("the rightmost cloud", objects[2]["box"]),
        ("the leftmost cloud", objects[0]["box"]),
        ("the cloud in the middle", objects[1]["box"]),
        ("the red frisbee next to the dog", objects[4]["box"]),
    ]:
        out = tools["grounding"](image=image, phrase=phrase)
        assert out.artifact["count"] == 1, (phrase, out.content)
        assert iou(out.artifact["boxes"][0], want) >= 0.5, (phrase, out.content)
