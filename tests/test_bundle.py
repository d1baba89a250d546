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
    from toolvlm.finetune.eval_world import iou

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
