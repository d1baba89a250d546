"""`toolvlm demo`: the four steps run in one session on the fixed crowd scene (scripted controller, fake tools)."""

from __future__ import annotations

import json

import yaml
from conftest import FakeCounter, FakeGrounding

from toolvlm.cli import main
from toolvlm.demo import QUESTIONS, demo_scene
from toolvlm.tools import registry


def call(name: str, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def test_demo_scene_is_a_crowd_with_a_tree():
    image, annotations = demo_scene()
    assert image.size == (224, 224)
    assert annotations["counts"]["tree"] == 1 and annotations["counts"]["person"] >= 20


def test_demo_runs_the_four_steps_in_one_session(tmp_path, capsys, monkeypatch):
    replies = [
        "People standing on the grass with a tree.",
        call("grounding", image="img_0", phrase="tree"),
        "The tree is boxed in img_1.",
        call("counter", image="img_0", phrase="person"),
        "About 8 people.",
        "I cannot generate images with these tools.",
    ]
    profile = tmp_path / "profile.yaml"
    profile.write_text(
        yaml.safe_dump({"controller": {"backend": "scripted", "replies": replies}, "tools": {}})
    )
    monkeypatch.setattr(
        registry, "build_tools", lambda spec: {"grounding": FakeGrounding(), "counter": FakeCounter()}
    )
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--profile", str(profile)]) == 0
    printed = capsys.readouterr().out
    for i, question in enumerate(QUESTIONS, 1):
        assert f"[{i}] {question}" in printed
    assert "tools: grounding" in printed and "tools: counter" in printed
    assert "About 8 people." in printed
    assert (out / "crowd.png").is_file() and (out / "crowd_annotations.json").is_file()
    steps = (out / "session" / "trajectory.jsonl").read_text().splitlines()
    assert sum(json.loads(line)["kind"] == "user" for line in steps) == 4
