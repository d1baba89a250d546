"""langchain-tests' standard tool suites on our tools through `to_langchain`: grounding and counter on the
committed bundle's detector, draw_boxes without a model; the image argument is a scene written to disk.

The suites are subclassed, never edited (their `test_no_overrides_DO_NOT_OVERRIDE` checks that). Their async
tests run under pytest-asyncio (a dependency of langchain-tests; `asyncio_mode = "auto"` in pyproject.toml).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from langchain_core.tools import BaseTool
from langchain_tests.integration_tests import ToolsIntegrationTests
from langchain_tests.unit_tests import ToolsUnitTests

from toolvlm.tools.counter import CounterTool
from toolvlm.tools.draw import DrawBoxesTool
from toolvlm.tools.grounding import GroundingTool
from toolvlm.tools.langchain import to_langchain

pytest_plugins = ["fixtures_tools"]  # draw_scene


@functools.cache
def _tool(name: str) -> BaseTool:
    """One LangChain tool per kind for the whole run (the detector loads once)."""
    ours = {"grounding": GroundingTool, "counter": CounterTool, "draw_boxes": DrawBoxesTool}[name]()
    return to_langchain(ours)


class SceneOnDisk:
    """Writes the scene the examples name before each test (the suites read the example as a property)."""

    image_path: Path

    @pytest.fixture(autouse=True)
    def _scene_on_disk(self, scene_path: Path) -> None:
        self.image_path = scene_path


class TestGroundingUnit(SceneOnDisk, ToolsUnitTests):
    @property
    def tool_constructor(self) -> BaseTool:
        return _tool("grounding")

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"image": str(self.image_path), "phrase": "person", "threshold": 0.05}


class TestGroundingIntegration(SceneOnDisk, ToolsIntegrationTests):
    @property
    def tool_constructor(self) -> BaseTool:
        return _tool("grounding")

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"image": str(self.image_path), "phrase": "person; tree", "max_boxes": 3}


class TestCounterUnit(SceneOnDisk, ToolsUnitTests):
    @property
    def tool_constructor(self) -> BaseTool:
        return _tool("counter")

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"image": str(self.image_path), "phrase": "person", "tiling": False}


class TestCounterIntegration(SceneOnDisk, ToolsIntegrationTests):
    @property
    def tool_constructor(self) -> BaseTool:
        return _tool("counter")

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"image": str(self.image_path), "phrase": "person", "threshold": 0.1}


class TestDrawBoxesUnit(SceneOnDisk, ToolsUnitTests):
    @property
    def tool_constructor(self) -> BaseTool:
        return _tool("draw_boxes")

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"image": str(self.image_path), "boxes": [[10, 10, 60, 80]], "labels": ["tree"]}


class TestDrawBoxesIntegration(SceneOnDisk, ToolsIntegrationTests):
    @property
    def tool_constructor(self) -> BaseTool:
        return _tool("draw_boxes")

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"image": str(self.image_path), "boxes": [[10, 10, 60, 80], [70, 50, 90, 85]]}
