"""`toolvlm mcp`: the tools as an MCP server, driven by the official `mcp` SDK's own client.

One test spawns `python -m toolvlm mcp` over stdio and runs the bundle's real grounding and counter on a world
scene; the others use the SDK's in-process transport with the fake tools of conftest.
"""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import anyio
import numpy as np
import pytest
from mcp import Client, ClientSession, StdioServerParameters, stdio_client
from PIL import Image

from toolvlm import bundle
from toolvlm.cli import main
from toolvlm.tools import registry
from toolvlm.tools.base import MissingWeightsError, Tool, ToolOutput
from toolvlm.tools.mcp_server import ToolHost, build_server, decode_image, load_tools_spec

ROOT = Path(__file__).resolve().parents[1]
TREE = [60, 70, 110, 160]
PEOPLE = [[130, 120, 150, 170], [160, 125, 180, 175], [20, 130, 40, 180]]


def world_scene() -> Image.Image:
    """A composed world scene: a tree and three people on grass."""
    from toolvlm.world import render_scene, scene_from_spec

    objects = [{"category": "tree", "box": TREE}]
    objects += [
        {"category": "person", "color": c, "box": b}
        for c, b in zip(["red", "blue", "green"], PEOPLE, strict=True)
    ]
    return render_scene(scene_from_spec({"objects": objects}))


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def image_blocks(result) -> list[Image.Image]:
    """The ImageContent blocks of a tool result, decoded (each must be a PNG)."""
    out = []
    for block in result.content:
        if block.type == "image":
            assert block.mime_type == "image/png"
            raw = base64.b64decode(block.data)
            assert raw[:8] == b"\x89PNG\r\n\x1a\n"
            out.append(Image.open(io.BytesIO(raw)).convert("RGB"))
    return out


def text_of(result) -> str:
    return "".join(block.text for block in result.content if block.type == "text")


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


def edge_changed(before: Image.Image, after: Image.Image, box) -> float:
    """Fraction of the points on a box's outline where the images differ (within a pixel of the point)."""
    a, b = np.asarray(before, dtype=int), np.asarray(after, dtype=int)
    changed = np.pad(np.abs(a - b).sum(axis=2) > 30, 1)
    near = np.zeros_like(changed)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            near |= np.roll(np.roll(changed, dy, axis=0), dx, axis=1)
    x0, y0, x1, y1 = (int(round(c)) for c in box)
    xs, ys = range(x0, x1 + 1), range(y0, y1 + 1)
    points = [(x, y0) for x in xs] + [(x, y1) for x in xs] + [(x0, y) for y in ys] + [(x1, y) for y in ys]
    points = [(x, y) for x, y in points if 0 <= x < a.shape[1] and 0 <= y < a.shape[0]]
    return sum(bool(near[y + 1, x + 1]) for x, y in points) / len(points)


@pytest.mark.skipif(not bundle.has("detector"), reason="the default bundle's detector is not built")
def test_stdio_server_runs_bundle_grounding_and_counter_on_a_world_scene(tmp_path):
    scene = world_scene()
    scene.save(tmp_path / "scene.png")
    out = tmp_path / "made"
    profile = tmp_path / "tools.yaml"
    profile.write_text("tools:\n  grounding: {backend: inhouse}\n  counter: {}\n")
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "toolvlm", "mcp", "--profile", str(profile), "--out", str(out)],
        cwd=str(ROOT),
        env={"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOOLVLM_BUNDLE": str(bundle.bundle_dir())},
    )

    async def session():
        async with stdio_client(params) as (read, write), ClientSession(read, write) as client:
            await client.initialize()
            listed = (await client.list_tools()).tools
            boxed = await client.call_tool(
                "grounding", {"image": str(tmp_path / "scene.png"), "phrase": "the tree"}
            )
            counted = await client.call_tool("counter", {"image": png_b64(scene), "phrase": "person"})
            return listed, boxed, counted

    listed, boxed, counted = anyio.run(session)

    assert [t.name for t in listed] == ["grounding", "counter"]
    grounding = next(t for t in listed if t.name == "grounding")
    assert grounding.input_schema == registry.schema("grounding")["parameters"]
    assert grounding.description == registry.schema("grounding")["description"]

    assert not boxed.is_error, text_of(boxed)
    box = boxed.structured_content["artifact"]["boxes"][0]
    assert iou(box, TREE) >= 0.5, boxed.structured_content
    assert "the tree" in text_of(boxed)
    (drawn,) = image_blocks(boxed)
    assert drawn.size == scene.size
    assert edge_changed(scene, drawn, box) > 0.8  # the box is drawn on its outline...
    inside = [int(box[0]) + 8, int(box[1]) + 8, int(box[2]) - 8, int(box[3]) - 8]
    assert edge_changed(scene, drawn, inside) < 0.2  # ...and not over the whole image
    (path,) = boxed.structured_content["images"]
    assert Path(path).parent == out and Image.open(path).convert("RGB").tobytes() == drawn.tobytes()

    assert not counted.is_error, text_of(counted)
    assert counted.structured_content["artifact"]["count"] == len(PEOPLE)
    found = counted.structured_content["artifact"]["boxes"]
    assert all(max(iou(b, p) for b in found) >= 0.5 for p in PEOPLE)
    assert len(image_blocks(counted)) == len(counted.structured_content["images"])


def call(server, name, arguments):
    async def go():
        async with Client(server) as client:
            return await client.list_tools(), await client.call_tool(name, arguments)

    return anyio.run(go)


def test_in_process_server_takes_data_urls_and_returns_made_images(agent_tools, tmp_path):
    server = build_server(ToolHost(agent_tools, tmp_path))
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    listed, result = call(
        server, "grounding", {"image": "data:image/png;base64," + png_b64(image), "phrase": "x"}
    )
    assert sorted(t.name for t in listed.tools) == sorted(agent_tools)
    assert not result.is_error
    assert text_of(result) == "found x at [2, 2, 20, 15]"
    (made,) = image_blocks(result)
    assert (
        made.size == (40, 30)
        and made.getpixel((2, 8)) == (255, 0, 0)
        and made.getpixel((30, 25)) == (10, 200, 30)
    )
    assert result.structured_content == {
        "content": "found x at [2, 2, 20, 15]",
        "artifact": {"boxes": [[2, 2, 20, 15]]},
        "images": [str(tmp_path / "grounding_0.png")],
        "error": False,
    }
    # the counter sees the very pixels sent, as bare base64
    _, counted = call(server, "counter", {"image": png_b64(Image.new("RGB", (80, 8))), "phrase": "dots"})
    assert counted.structured_content["artifact"]["count"] == 10 and not image_blocks(counted)


def test_errors_come_back_as_error_results_saying_what_to_change(agent_tools, tmp_path):
    server = build_server(ToolHost(agent_tools, tmp_path))
    _, unknown = call(server, "detect", {"image": "x.png"})
    assert unknown.is_error and "unknown tool 'detect'; tools are: counter, grounding, broken" in text_of(
        unknown
    )
    _, bad = call(server, "counter", {"image": "data:image/png;base64,@@@", "phrase": "x"})
    assert bad.is_error and "argument 'image'" in text_of(bad) and "not valid base64" in text_of(bad)
    junk = base64.b64encode(b"not an image at all" * 8).decode()
    _, bad = call(server, "counter", {"image": junk, "phrase": "x"})
    assert bad.is_error and "not an image file" in text_of(bad)
    _, missing = call(server, "counter", {"image": str(tmp_path / "none.png"), "phrase": "x"})
    assert missing.is_error and f"no image file {str(tmp_path / 'none.png')!r} on the server" in text_of(
        missing
    )
    image = "data:image/png;base64," + png_b64(Image.new("RGB", (16, 16)))
    _, empty = call(server, "counter", {"image": image, "phrase": " "})
    assert empty.is_error and "phrase is empty" in text_of(empty)
    assert not list(tmp_path.iterdir())  # no image was made


class Unweighted(Tool):
    """A tool whose weights are missing: its setup raises."""

    name = "unweighted"
    description = "Needs weights that are not there."
    inputs = {"type": "object", "properties": {}}

    def setup(self) -> None:
        raise MissingWeightsError("unweighted: no weights in /nowhere; give 'model:' in the profile")

    def forward(self) -> ToolOutput:
        return ToolOutput("never")


def test_missing_weights_come_back_as_an_error_result(tmp_path):
    _, result = call(build_server(ToolHost({"unweighted": Unweighted()}, tmp_path)), "unweighted", {})
    assert result.is_error and "no weights in /nowhere" in text_of(result)


def test_decode_image_leaves_paths_alone(tmp_path):
    path = tmp_path / ("a" * 70 + ".png")  # long, and base64-looking, but a file that exists
    Image.new("RGB", (5, 4)).save(path)
    assert decode_image(str(path)) == str(path)
    assert decode_image("photos/cat.png") == "photos/cat.png"
    assert decode_image(png_b64(Image.new("RGB", (5, 4)))).size == (5, 4)


def test_profile_spec_resolves_models_beside_it_and_cli_reports_bad_profiles(tmp_path, capsys):
    (tmp_path / "detector").mkdir()
    profile = tmp_path / "p.yaml"
    profile.write_text(
        "controller: {backend: local}\ntools:\n  grounding: {backend: inhouse, model: detector}\n"
    )
    assert load_tools_spec(str(profile)) == {
        "grounding": {"backend": "inhouse", "model": str(tmp_path / "detector")}
    }
    assert set(load_tools_spec(None)) == set(registry.names())
    assert main(["mcp", "--profile", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty.yaml").write_text("tools: {}\n")
    assert main(["mcp", "--profile", str(tmp_path / "empty.yaml")]) == 2
    assert "lists no tools" in capsys.readouterr().err


def test_streamable_http_transport_on_loopback(agent_tools, tmp_path):
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = build_server(ToolHost(agent_tools, tmp_path)).streamable_http_app(host="127.0.0.1")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    image = "data:image/png;base64," + png_b64(Image.new("RGB", (24, 24), (0, 0, 200)))
    try:
        listed, result = call(f"http://127.0.0.1:{port}/mcp", "grounding", {"image": image, "phrase": "sky"})
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert {t.name for t in listed.tools} == set(agent_tools)
    (made,) = image_blocks(result)
    assert made.size == (24, 24) and made.getpixel((2, 5)) == (255, 0, 0)
    assert result.structured_content["artifact"] == {"boxes": [[2, 2, 12, 12]]}
