"""The captioner end to end on tiny random BLIP and BLIP-2 checkpoints (and the in-house BLIP-architecture one)."""

from __future__ import annotations

import pytest

from toolvlm.tools import MissingWeightsError
from toolvlm.tools.captioner import CaptionerTool

pytest_plugins = ["fixtures_tools"]  # fixtures: scene, tiny_models, scene_path


@pytest.mark.parametrize(("backend", "kind"), [("blip", "blip"), ("blip2", "blip2"), ("inhouse", "blip")])
def test_captioner_backend_end_to_end(scene, tiny_models, backend, kind):
    tool = CaptionerTool(backend=backend, model=str(tiny_models(kind)), max_new_tokens=6)
    out = tool(image=scene())
    assert not out.error
    assert out.artifact["style"] == "sentence"
    assert out.artifact["caption"] in out.content or "no text" in out.content
    again = tool(image=scene())
    assert again.content == out.content  # greedy decoding is deterministic


def test_captioner_region_and_paragraph(scene, tiny_models):
    tool = CaptionerTool(backend="blip", model=str(tiny_models("blip")), max_new_tokens=6)
    image = scene(160, 120)
    region = tool(image=image, box=[10, 10, 80, 90])
    assert not region.error and region.artifact["box"] == [10, 10, 80, 90]
    clipped = tool(image=image, box=[100, 50, 400, 300])
    assert (
        not clipped.error and "clipped" in clipped.content and clipped.artifact["box"] == [100, 50, 160, 120]
    )
    paragraph = tool(image=image, style="paragraph")
    assert not paragraph.error and paragraph.artifact["style"] == "paragraph"


def test_captioner_bad_input(scene, tiny_models):
    tool = CaptionerTool(backend="blip", model=str(tiny_models("blip")), max_new_tokens=4)
    image = scene(160, 120)
    outside = tool(image=image, box=[500, 500, 600, 600])
    assert outside.error and "outside the image" in outside.content and "160x120" in outside.content
    reversed_box = tool(image=image, box=[50, 50, 10, 10])
    assert reversed_box.error and "x0 < x1" in reversed_box.content
    short = tool(image=image, box=[1, 2, 3])
    assert short.error and "box" in short.content
    style = tool(image=image, style="haiku")
    assert style.error and "sentence" in style.content
    gray = tool(image=image.convert("LA"))
    assert not gray.error


def test_captioner_refuses_a_detector_checkpoint(scene, tiny_models):
    tool = CaptionerTool(backend="blip", model=str(tiny_models("owlvit")))
    with pytest.raises(ValueError, match="blip"):
        tool(image=scene())


def test_captioner_without_weights(scene, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLVLM_BUNDLE", str(tmp_path))  # a bundle without the captioner
    with pytest.raises(MissingWeightsError, match="captioner"):
        CaptionerTool()(image=scene())


def test_world_tokenizer_pieces_are_joined_into_numbers_and_punctuation():
    from toolvlm.tools.captioner import join_pieces

    assert (
        join_pieces("about 3 0 people , a dog 's ball and 1 2 birds .")
        == "about 30 people, a dog's ball and 12 birds."
    )
    assert join_pieces("a red frisbee") == "a red frisbee"
