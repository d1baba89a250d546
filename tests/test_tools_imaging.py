"""Image and box utilities, the draw_boxes tool and layout editing (no models)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from toolvlm.tools import ToolInputError, imaging
from toolvlm.tools.count_change import target_count
from toolvlm.tools.draw import DrawBoxesTool
from toolvlm.tools.layout import Layout, edit_layout, layout_prompt

coord = st.floats(-500, 1500, allow_nan=False)

pytest_plugins = ["fixtures_tools"]  # fixtures: scene, tiny_models, scene_path


@settings(max_examples=50, deadline=None, database=None)
@given(w=st.integers(1, 800), h=st.integers(1, 800), box=st.lists(coord, min_size=4, max_size=4))
def test_property_clipped_boxes_stay_inside(w, h, box):
    x0, y0, x1, y1 = imaging.clip_box(box, w, h)
    assert 0 <= x0 <= w and 0 <= x1 <= w and 0 <= y0 <= h and 0 <= y1 <= h


@settings(max_examples=50, deadline=None, database=None)
@given(w=st.integers(1, 3000), h=st.integers(1, 3000), tile=st.integers(16, 800), overlap=st.floats(0, 0.5))
def test_property_tiles_cover_the_image(w, h, tile, overlap):
    windows = imaging.tiles(w, h, tile, overlap)
    assert all(0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and x1 - x0 <= tile for x0, y0, x1, y1 in windows)
    xs = sorted({(x0, x1) for x0, _, x1, _ in windows})
    assert xs[0][0] == 0 and xs[-1][1] == w
    assert all(a[1] >= b[0] for a, b in zip(xs, xs[1:], strict=False))  # no gaps


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = [[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]]
    assert imaging.nms(boxes, [0.5, 0.9, 0.3], 0.5) == [1, 2]
    assert imaging.nms([], [], 0.5) == []


def test_nms_can_drop_a_part_inside_a_whole():
    whole, head, neighbour = [0, 0, 40, 60], [10, 0, 30, 20], [35, 0, 75, 60]  # head: IoU 1/6 with the whole
    boxes, scores = [whole, head, neighbour], [0.9, 0.8, 0.7]
    assert imaging.nms(boxes, scores, 0.5) == [0, 1, 2]
    assert imaging.nms(boxes, scores, 0.5, contain_threshold=0.7) == [0, 2]  # the neighbour only touches it
    assert imaging.nms(boxes, [0.5, 0.8, 0.7], 0.5, contain_threshold=0.7) == [1, 2]  # the better box stays


def test_nms_between_groups_has_its_own_threshold():
    a, c, near = [0, 0, 10, 30], [30, 0, 40, 30], [2, 0, 12, 30]  # near: IoU 8/12 with a
    shifted = [5, 0, 15, 30]  # IoU 5/15 with a: kept by NMS at 0.5 ...
    assert imaging.nms([a, shifted, c], [0.9, 0.8, 0.7], 0.5, groups=[0, 1, 1]) == [0, 1, 2]
    # ... but a box of another view (group) goes above 0.3, while one of the same view keeps NMS's 0.5
    assert imaging.nms([a, shifted, c], [0.9, 0.8, 0.7], 0.5, groups=[0, 1, 1], cross_iou=0.3) == [0, 2]
    assert imaging.nms([a, shifted, c], [0.9, 0.8, 0.7], 0.5, groups=[0, 0, 1], cross_iou=0.3) == [0, 1, 2]
    assert imaging.nms([a, near, c], [0.9, 0.8, 0.7], 0.5, groups=[0, 0, 1], cross_iou=0.3) == [0, 2]


def test_fit_image_and_modes():
    big, scale = imaging.fit_image(Image.new("RGB", (4000, 1000)), 1000)
    assert big.size == (1000, 250) and scale == 0.25
    same, one = imaging.fit_image(Image.new("RGB", (10, 10)), 1000)
    assert one == 1.0 and same.size == (10, 10)
    for mode in ("L", "LA", "RGBA", "P", "1", "CMYK", "I", "F"):
        assert imaging.to_rgb(Image.new(mode, (4, 4))).mode == "RGB"
    transparent = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert imaging.to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)


def test_load_image_errors(tmp_path):
    with pytest.raises(ToolInputError, match="image file not found"):
        imaging.load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ToolInputError, match="not an image"):
        imaging.load_image(bad)


def test_draw_boxes_tool(scene):
    draw = DrawBoxesTool()
    image = scene(100, 80)
    out = draw(image=image, boxes=[[10, 10, 50, 50], [60, 20, 150, 70]], labels=["tree", "person"])
    assert not out.error and out.images[0].size == (100, 80)
    assert out.artifact["boxes"][1] == [60, 20, 100, 70] and "clipped" in out.content
    assert out.images[0].getpixel((10, 30)) != image.getpixel((10, 30))
    assert draw(image=image, boxes=[[200, 200, 300, 300]]).error
    assert "one label per box" in draw(image=image, boxes=[[1, 1, 5, 5]], labels=["a", "b"]).content
    assert draw(image=image, boxes=[[1, 1, 5]]).error
    assert draw(image=image, boxes="[[1, 1, 5, 5]]").artifact["boxes"] == [[1, 1, 5, 5]]


def test_target_count_forms():
    assert target_count(2.0, 85) == 170
    assert target_count("x2", 3) == 6
    assert target_count("+3", 1) == 4
    assert target_count("-5", 3) == 0
    assert target_count("=10", 3) == 10
    assert target_count(0.5, 5) == 2
    assert target_count("double", 3) == 6  # words too: tests/test_tools_count_change.py
    with pytest.raises(ToolInputError):
        target_count(True, 3)


@settings(max_examples=30, deadline=None, database=None)
@given(
    people=st.integers(0, 12),
    trees=st.integers(0, 3),
    factor=st.sampled_from([0, 0.5, 1, 2, 3, "+2", "-1", "=4"]),
    seed=st.integers(0, 1000),
)
def test_property_edit_layout_counts_and_keeps_the_rest(people, trees, factor, seed):
    layout = Layout(200, 100)
    layout.boxes = [[10 + 10 * i, 50, 18 + 10 * i, 90] for i in range(people)] + [[0, 0, 30, 60]] * trees
    layout.labels = ["person"] * people + ["tree"] * trees
    edited, _ = edit_layout(layout, {"person": factor}, seed)
    assert edited.counts().get("person", 0) == target_count(factor, people)
    assert edited.counts().get("tree", 0) == trees
    assert all(0 <= b[0] < b[2] <= 200 and 0 <= b[1] < b[3] <= 100 for b in edited.boxes)
    again, _ = edit_layout(layout, {"person": factor}, seed)
    assert again.boxes == edited.boxes


def test_layout_prompt():
    assert layout_prompt({"person": 3, "tree": 1}) == "a photo with 3 people, one tree"
    assert layout_prompt({"red car": 2, "bus": 2}) == "a photo with 2 red cars, 2 buses"
    assert layout_prompt({}, "a park") == "a park"
