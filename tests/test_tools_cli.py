"""`toolvlm tools` and `toolvlm tool` through the real command-line dispatcher."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml
from PIL import Image

from toolvlm.cli import main

pytest_plugins = ["fixtures_tools"]  # tiny_models, scene_path


def test_tools_json_lists_the_builtins_with_schemas():
    out = subprocess.run(
        [sys.executable, "-m", "toolvlm", "tools", "--json"], capture_output=True, text=True, check=True
    )
    tools = {t["name"]: t for t in json.loads(out.stdout)}
    assert {"grounding", "captioner", "counter", "generator", "draw_boxes"} <= set(tools)
    for t in tools.values():
        assert t["description"] and t["parameters"]["type"] == "object"
    assert tools["grounding"]["parameters"]["properties"]["image"]["format"] == "image"


def test_tools_plain_listing(capsys):
    assert main(["tools"]) == 0
    text = capsys.readouterr().out
    assert "counter: Count" in text and "phrase (string)" in text and "threshold (number, optional)" in text


def _profile(tmp_path, tiny_models) -> str:
    profile = {
        "controller": {"backend": "something-else"},  # ignored by the tools
        "tools": {"grounding": {"backend": "owlvit", "model": str(tiny_models("owlvit")), "threshold": 0.0}},
    }
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    return str(path)


def test_tool_counter_json_writes_the_annotated_image(tmp_path, monkeypatch, capsys, tiny_models, scene_path):
    monkeypatch.chdir(tmp_path)
    profile = _profile(tmp_path, tiny_models)
    code = main(["tool", "counter", str(scene_path), "phrase=person", "--json", "--profile", profile])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["tool"] == "counter" and result["error"] is False
    assert result["artifact"]["count"] == len(result["artifact"]["boxes"]) > 0
    assert result["arguments"]["phrase"] == "person"
    (image,) = result["images"]
    assert image.startswith("toolvlm_out/")
    with Image.open(tmp_path / image) as written:
        assert written.size == (160, 120)
    code = main(["tool", "grounding", str(scene_path), "phrase=tree", "--out", "shots", "--profile", profile])
    text = capsys.readouterr().out
    assert code == 0 and text.startswith("found") and "image: shots/grounding_0.png" in text


def test_tool_without_weights_says_how_to_configure(tmp_path, monkeypatch, capsys, scene_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOOLVLM_BUNDLE", str(tmp_path / "empty_bundle"))  # no default weights either
    code = main(["tool", "counter", str(scene_path), "phrase=person"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no weights" in err and "--profile" in err and "Traceback" not in err


def test_tool_errors_are_reported(tmp_path, monkeypatch, capsys, scene_path):
    monkeypatch.chdir(tmp_path)
    assert main(["tool", "draw_boxes", str(scene_path), "boxes=[[500, 500, 600, 600]]", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["error"] and "outside the image" in result["content"]
    assert main(["tool", "nope", str(scene_path)]) == 2
    assert "unknown tool" in capsys.readouterr().err
    assert main(["tool", "draw_boxes", str(scene_path), "boxes"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert main(["tool", "counter", str(scene_path), "--profile", "missing.yaml"]) == 2
    assert "profile" in capsys.readouterr().err
    assert main(["tool", "draw_boxes", str(scene_path), "boxes=[[1, 1, 9, 9]]", 'labels=["x"]']) == 0
    assert "drew 1 box" in capsys.readouterr().out


def test_tool_generator_without_image(tmp_path, monkeypatch, capsys, tiny_models):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "p.yaml"
    spec = {"generator": {"backend": "inhouse", "model": str(tiny_models("inhouse_generator")), "steps": 1}}
    path.write_text(yaml.safe_dump({"tools": spec}))
    assert (
        main(["tool", "generator", "-", "prompt=two people", "seed=1", "--json", "--profile", str(path)]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["artifact"]["mode"] == "text" and len(result["images"]) == 1
    assert main(["tool", "generator", "prompt=a dog", "--profile", str(path)]) == 0
    assert "generated a 32x32 image" in capsys.readouterr().out


def test_inhouse_backends_find_the_default_bundle(tmp_path, monkeypatch):
    import pytest

    from toolvlm.tools import hf
    from toolvlm.tools.base import MissingWeightsError

    monkeypatch.setenv("TOOLVLM_BUNDLE", str(tmp_path))
    with pytest.raises(MissingWeightsError, match="not installed yet"):
        hf.model_folder("counter", "inhouse", None)
    (tmp_path / "detector").mkdir()
    (tmp_path / "detector" / "config.json").write_text("{}")
    (tmp_path / "detector" / "model.safetensors").write_bytes(b"")
    assert hf.model_folder("counter", "inhouse", None) == tmp_path / "detector"
    assert hf.model_folder("grounding", "inhouse", None) == tmp_path / "detector"
