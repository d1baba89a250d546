"""Profiles: the shipped examples parse and name existing backends; bad profiles fail with clear messages."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures_vlm import tiny_lm_dir, tiny_spec  # noqa: F401

from toolvlm.agent.assistant import Assistant
from toolvlm.agent.openai_controller import OpenAIController
from toolvlm.agent.profiles import (
    Profile,
    ProfileError,
    build_controller,
    check_profile,
    default_profile,
    find_profile,
    load_profile,
)
from toolvlm.tools.registry import build_tools

EXAMPLES = sorted((Path(__file__).parents[1] / "examples" / "profiles").glob("*.yaml"))


def test_examples_exist():
    names = {p.stem for p in EXAMPLES}
    assert {"llava15-owlv2-blip-sdturbo", "qwen2vl-native-tools", "openai-endpoint"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_profile_parses_and_names_existing_backends(path):
    profile = load_profile(path, check_models=False)  # its model folders are on another machine
    assert check_profile(profile, check_models=False) == []
    assert profile.tools, "an example profile configures tools"
    tools = build_tools(profile.tools)  # constructors only: weights load on first use
    assert sorted(tools) == sorted(profile.tools)
    if profile.controller["backend"] == "local":
        assert isinstance(profile.controller["model"], str) and profile.controller["model"]
    else:
        assert isinstance(build_controller(profile.controller), OpenAIController)


def test_qwen_profile_uses_native_tool_calling():
    profile = load_profile(next(p for p in EXAMPLES if p.stem == "qwen2vl-native-tools"), check_models=False)
    assert profile.agent["native_tools"] is True and "Qwen2-VL" in profile.controller["model"]


def test_profile_problems_are_named(tmp_path):
    data = {"controller": {"backend": "telepathy"}, "tools": {"grounding": {"backend": "yolo"}, "oracle": {}}}
    bad = Profile.from_dict(data)
    problems = check_profile(bad)
    assert any("unknown controller backend 'telepathy'" in p for p in problems)
    assert any(
        "tools.grounding.backend: unknown backend 'yolo'; backends are:" in p and "owlv2" in p
        for p in problems
    )
    assert any("unknown tool 'oracle'" in p for p in problems)
    with pytest.raises(ProfileError, match="(?s)3 problem.*unknown controller backend 'telepathy'"):
        load_profile(data)  # loading checks
    with pytest.raises(ProfileError, match="unknown controller backend 'telepathy'"):
        build_controller(bad.controller)
    with pytest.raises(ProfileError, match="unknown key"):
        load_profile({"controller": {}, "tool": {}})
    with pytest.raises(ProfileError, match="no profile named 'nowhere'"):
        find_profile("nowhere")


def test_profile_by_name_and_default_bundle(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("controller: {backend: scripted, replies: [hello]}\ntools: {}\n")
    monkeypatch.setenv("TOOLVLM_PROFILES", str(tmp_path))
    bot = Assistant.from_profile("mine", max_steps=2)
    assert bot.agent.config.max_steps == 2
    assert bot.chat("hi").text == "hello"
    with pytest.raises(ValueError, match="unknown agent option"):
        Assistant.from_profile("mine", max_stepz=2)


def test_default_profile_from_the_bundle(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLVLM_BUNDLE", str(tmp_path))
    with pytest.raises(ProfileError, match="default bundle is not built"):
        default_profile()
    for part in ("controller", "detector", "captioner"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "model.safetensors").write_bytes(b"")
    made = default_profile()
    assert made.controller == {"backend": "local", "model": str(tmp_path / "controller")}
    assert made.tools["grounding"] == {"backend": "inhouse", "model": str(tmp_path / "detector")}
    assert made.tools["counter"] == {} and "generator" not in made.tools and "draw_boxes" in made.tools
    assert check_profile(made) == []
    (tmp_path / "profile.yaml").write_text(
        "controller: {backend: local, model: controller}\ntools: {grounding: {backend: inhouse, model: detector}}\n"
    )
    shipped = default_profile()
    assert shipped.controller["model"] == str(tmp_path / "controller")
    assert shipped.tools["grounding"]["model"] == str(tmp_path / "detector")


def test_a_profile_files_relative_models_are_taken_beside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "..")  # not the profile's folder
    (tmp_path / "detector").mkdir()
    (tmp_path / "p.yaml").write_text(
        "controller: {backend: local, model: controller}\n"
        "tools: {grounding: {backend: inhouse, model: detector}, captioner: {backend: blip, model: org/blip}}\n"
    )
    profile = load_profile(tmp_path / "p.yaml", check_models=False)
    assert profile.tools["grounding"]["model"] == str(tmp_path / "detector")
    assert profile.tools["captioner"]["model"] == "org/blip"  # a hub id: nothing of that name beside it
    assert profile.controller["model"] == str(tmp_path / "controller")  # beside it, though absent
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ProfileError) as caught:
        load_profile(tmp_path / "p.yaml")  # checked: the controller's folder is missing, the hub is off
    text = str(caught.value)
    assert str(tmp_path / "p.yaml") in text and "2 problem(s)" in text
    assert f"controller.model: model folder '{tmp_path / 'controller'}' not found" in text
    assert (
        "tools.captioner.model: no folder 'org/blip' beside the profile" in text
        and "cannot be reached offline" in text
    )


def test_the_bundle_profile_loads():
    bundle = Path(__file__).parents[1] / "bundle" / "profile.yaml"
    profile = load_profile(bundle, check_models=False)
    assert profile.controller["backend"] == "local" and profile.agent["constrained"] is True
    assert profile.tools["captioner"]["vocabulary"][:2] == ["person", "tree"]
    assert check_profile(profile, check_models=False) == []


def bad_profile(tmp_path: Path, text: str) -> str:
    """The one-line ProfileError of a profile file holding `text`."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError) as caught:
        load_profile(path, check_models=False)
    message = str(caught.value)
    assert message.startswith(f"profile {path}: ")
    return message


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "controller: {backend: openai, base_url: x, model: m, timeout: slow}",
            "controller.timeout: expected a number, got 'slow'",
        ),
        (
            "controller: {backend: openai, base_url: x, model: m, send_images: no}",
            "controller.send_images: expected true or false, got 'no'",
        ),
        ("controller: {backend: local, model: 7}", "controller.model: expected a string or "),
        (
            "controller: {backend: local, model: m, decode_kernels: fast}",
            "controller.decode_kernels: expected 'exact' or 'prepacked', got 'fast'",
        ),
        ("controller: {backend: local}", "controller.model: missing (it is required)"),
        ("controller: {backend: scripted, replies: hi}", "controller.replies: expected a list, got 'hi'"),
        (
            "controller: {backend: scripted, replies: [hi, 3]}",
            "controller.replies[1]: expected a string, got 3",
        ),
        (
            "controller: {model: m}\ntools: {grounding: {threshold: high}}",
            "tools.grounding.threshold: expected a number, got 'high'",
        ),
        (
            "controller: {model: m}\ntools: {captioner: {backend: grounded, vocabulary: person}}",
            "tools.captioner.vocabulary: expected a list, got 'person'",
        ),
        (
            "controller: {model: m}\nagent: {max_steps: many}",
            "agent.max_steps: expected an integer, got 'many'",
        ),
        ("controller: {model: m}\ndomain: {stats: 3}", "domain.stats: expected a string, got 3"),
        ("controller: {model: m}\ndescription: [a]", "description: expected a string, got ['a']"),
        ("controller: local", "controller: expected a mapping, got 'local'"),
        ("tools: {}", "controller: missing (it is required)"),
        ("", "expected a mapping with 'controller:' and 'tools:', got an empty file"),
    ],
)
def test_a_wrong_type_names_the_file_and_the_key(tmp_path, text, expected):
    assert expected in bad_profile(tmp_path, text + "\n")


def test_unknown_keys_are_refused_at_every_level(tmp_path):
    message = bad_profile(
        tmp_path,
        "controler: {model: m}\n"
        "controller: {model: m, devise: cpu}\n"
        "tools: {grounding: {thresh: 0.3}, counter: {}}\n"
        "agent: {max_stepz: 3}\n"
        "domain: {stat: d.safetensors}\n",
    )
    assert "5 problem(s)" in message
    for line in [
        "controler: unknown key (did you mean 'controller'?); keys are: description, controller, tools, agent",
        "controller.devise: unknown key (did you mean 'device'?); keys are: backend, model, device, dtype",
        "tools.grounding.thresh: unknown key (did you mean 'threshold'?); keys are: backend, model, device,",
        "agent.max_stepz: unknown key (did you mean 'max_steps'?)",
        "domain.stat: unknown key (did you mean 'stats'?); keys are: stats, device",
    ]:
        assert line in message
    openai = bad_profile(tmp_path, "controller: {backend: openai, base_url: x, model: m, key: k}\n")
    assert (
        "controller.key: unknown key" in openai and "keys are: backend, base_url, model, api_key," in openai
    )


def test_build_controller_checks_its_backends_options():
    with pytest.raises(ProfileError, match=r"controller\.replies: expected a list, got 'hi'"):
        build_controller({"backend": "scripted", "replies": "hi"})
    with pytest.raises(ProfileError, match=r"controller\.dtype: expected a string, got 16"):
        build_controller({"backend": "local", "model": "m", "dtype": 16})
    with pytest.raises(ProfileError, match=r"controller\.stream: unknown key"):
        build_controller({"backend": "openai", "base_url": "x", "model": "m", "stream": True})
    assert build_controller({"backend": "scripted", "replies": ["hi"], "chunk_size": 2}).chunk_size == 2


def test_a_local_controller_gets_its_decode_kernels(tiny_lm_dir):  # noqa: F811
    spec = tiny_spec(tiny_lm_dir).to_dict()
    default = build_controller({"backend": "local", "model": spec})
    packed = build_controller({"backend": "local", "model": spec, "decode_kernels": "prepacked"})
    assert default.vlm.engine.decode_kernels == "exact"
    assert packed.vlm.engine.decode_kernels == "prepacked"
    reply = "".join(packed.stream([{"role": "user", "content": "hi"}], max_new_tokens=4))
    assert packed.vlm.engine._fast is not None and packed.vlm.engine._fast.kernels == "prepacked"
    assert isinstance(reply, str)


def test_the_cli_shows_a_bad_profile_in_one_line(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from toolvlm.cli import main

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (16, 16)).save("a.png")
    Path("p.yaml").write_text(
        "controller: {backend: scripted, replies: [hi], chunk_size: big}\nagent: {x: 1}\n"
    )
    assert main(["ask", "a.png", "what is this?", "--profile", "p.yaml", "--out", "s"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "p.yaml: 2 problem(s): controller.chunk_size: expected an integer, got 'big'" in err
    assert "agent.x: unknown key" in err
    Path("t.yaml").write_text("tools: {counter: {tile_size: 1.5}}\n")
    assert main(["tool", "counter", "a.png", "phrase=person", "--profile", "t.yaml"]) == 2
    err = capsys.readouterr().err
    assert err == "toolvlm tool: profile t.yaml: tools.counter.tile_size: expected an integer, got 1.5\n"
