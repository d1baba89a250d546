"""toolvlm.agent: the loop that lets a VLM controller call tools, and what users touch around it.

Modules: `protocol` (parse `<tool_call>` JSON from replies), `trajectory` (dataclass steps, messages, JSON),
`memory` (image handles img_0, img_1, ...), `session` (session folders: JSONL + images), `prompting` (prompt
templates from toolvlm.prompts), `controllers` (the Controller protocol, scripted and local VLM controllers),
`openai_controller` (OpenAI-compatible endpoints), `constrained` (schema-constrained tool calls, llguidance),
`loop` (the Agent), `events`, `profiles` (YAML profiles), `assistant` (the Python API), `cli_chat`, `cli_ask`.

Importing this package is cheap; torch, transformers and the tools load when used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Assistant": "assistant",
    "Reply": "assistant",
    "Agent": "loop",
    "AgentConfig": "loop",
    "ScriptedController": "controllers",
    "LocalVLMController": "controllers",
    "OpenAIController": "openai_controller",
    "Trajectory": "trajectory",
    "SessionStore": "session",
    "load_session": "session",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'toolvlm.agent' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
