"""toolvlm.tools: tool models behind one contract (grounding, captioner, counter, generator, draw_boxes).

Importing this package is cheap: it exposes the contract and the registry; models load on a tool's first call.
"""

from toolvlm.tools.base import MissingWeightsError, Tool, ToolInputError, ToolOutput, tool
from toolvlm.tools.registry import build_tools, get, list_tools, names, register

__all__ = [
    "MissingWeightsError",
    "Tool",
    "ToolInputError",
    "ToolOutput",
    "build_tools",
    "get",
    "list_tools",
    "names",
    "register",
    "tool",
]
