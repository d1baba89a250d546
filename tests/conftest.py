"""Shared fixtures of the agent tests: small fake tools on the real Tool base class, and test images."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

from toolvlm.tools.base import Tool, ToolInputError, ToolOutput

IMAGE = {"type": "string", "format": "image", "description": "an image handle, e.g. img_0"}


class FakeCounter(Tool):
    """Counts 'objects' as the image's width divided by 8; remembers the images it was given."""

    name = "counter"
    description = "Count the objects matching a phrase in an image."
    inputs = {
        "type": "object",
        "properties": {"image": IMAGE, "phrase": {"type": "string", "description": "what to count"}},
        "required": ["image", "phrase"],
    }

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Image.Image] = []

    def forward(self, image: Image.Image, phrase: str) -> ToolOutput:
        self.seen.append(image)
        if not phrase.strip():
            raise ToolInputError("phrase is empty; say what to count, e.g. 'person'")
        n = image.width // 8
        return ToolOutput(content=f"about {n} {phrase}", artifact={"count": n, "phrase": phrase})


class FakeGrounding(Tool):
    """Draws a red box on a copy of the image and returns it as a new image."""

    name = "grounding"
    description = "Find the region matching a phrase; returns the box and the image with the box drawn."
    inputs = {
        "type": "object",
        "properties": {"image": IMAGE, "phrase": {"type": "string"}},
        "required": ["image", "phrase"],
    }

    def forward(self, image: Image.Image, phrase: str) -> ToolOutput:
        box = [2, 2, image.width // 2, image.height // 2]
        drawn = image.copy()
        ImageDraw.Draw(drawn).rectangle(box, outline=(255, 0, 0), width=2)
        return ToolOutput(content=f"found {phrase} at {box}", images=[drawn], artifact={"boxes": [box]})


class BrokenTool(Tool):
    """Raises: a bug, which must propagate."""

    name = "broken"
    description = "Always fails with a bug."
    inputs = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}

    def forward(self, x: int) -> ToolOutput:
        raise RuntimeError(f"bug in broken tool (x={x})")


def make_image(width: int = 64, height: int = 48, color: tuple[int, int, int] = (40, 160, 60)) -> Image.Image:
    """A plain test image."""
    return Image.new("RGB", (width, height), color)


@pytest.fixture
def agent_tools() -> dict[str, Tool]:
    """A counter, a grounding tool and a broken tool."""
    return {t.name: t for t in (FakeCounter(), FakeGrounding(), BrokenTool())}


@pytest.fixture
def agent_image() -> Image.Image:
    """A 64x48 test image."""
    return make_image()


def drive(repl_factory, lines: list[str]) -> tuple[str, int]:
    """Run a REPL on scripted lines; return everything it showed (prompts and echoed input included)."""
    out: list[str] = []
    feed = iter(lines)

    def read(prompt: str) -> str:
        out.append(prompt)
        try:
            line = next(feed)
        except StopIteration:
            raise EOFError from None
        if line == "^C":
            out.append("^C\n")
            raise KeyboardInterrupt
        out.append(line + "\n")
        return line

    code = repl_factory(read, out.append).loop()
    return "".join(out), code
