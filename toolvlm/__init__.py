"""toolvlm: an agentic multimodal assistant.

The package root only re-exports the public API; heavy modules (torch, transformers) load on first use,
so `import toolvlm` and `toolvlm --help` stay instant.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Assistant": "toolvlm.agent.assistant",
    "Reply": "toolvlm.agent.assistant",
    "VLM": "toolvlm.vlm",
    "build_vlm": "toolvlm.vlm",
    "load_vlm": "toolvlm.vlm",
    "Tool": "toolvlm.tools.base",
    "ToolOutput": "toolvlm.tools.base",
    "tool": "toolvlm.tools.base",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'toolvlm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
