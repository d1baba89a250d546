"""Agent events and steps as the JSON the server sends: to its web page (SSE) and in `toolvlm_steps`.

Images are never inlined: each made image is `{"handle": "img_1", "url": "/sessions/ID/images/img_1.png"}`,
a URL the server serves. This module knows the event and step types, not HTTP.
"""

from __future__ import annotations

import json
from typing import Any

from toolvlm.agent.events import AnswerEvent, Event, TokenEvent, ToolCallEvent, ToolResultEvent
from toolvlm.agent.session import jsonable
from toolvlm.agent.trajectory import Step, ToolStep


def image_url(session_id: str, handle: str, base: str = "") -> str:
    """The URL the server serves an image of a session at (`base`: e.g. "http://127.0.0.1:8000")."""
    return f"{base.rstrip('/')}/sessions/{session_id}/images/{handle}.png"


def image_refs(session_id: str, handles: list[str], base: str = "") -> list[dict[str, str]]:
    """Handles with their URLs."""
    return [{"handle": h, "url": image_url(session_id, h, base)} for h in handles]


def step_json(step: ToolStep, session_id: str, base: str = "") -> dict[str, Any]:
    """One tool step: tool, arguments, content (what the model read), artifact, error, images."""
    return {
        "tool": step.name,
        "arguments": jsonable(step.arguments),
        "content": step.content,
        "artifact": jsonable(step.artifact),
        "error": step.error,
        "images": image_refs(session_id, step.images, base),
    }


def tool_steps(steps: list[Step], session_id: str, base: str = "") -> list[dict[str, Any]]:
    """The tool steps of a turn as JSON."""
    return [step_json(s, session_id, base) for s in steps if isinstance(s, ToolStep)]


def event_json(event: Event, session_id: str, base: str = "") -> dict[str, Any]:
    """One agent event as JSON with a "type": token, tool_call, tool_result or answer."""
    if isinstance(event, TokenEvent):
        return {"type": "token", "text": event.text}
    if isinstance(event, ToolCallEvent):
        return {"type": "tool_call", "tool": event.call.name, "arguments": jsonable(event.call.arguments)}
    if isinstance(event, ToolResultEvent):
        return {"type": "tool_result", "step": step_json(event.step, session_id, base)}
    if isinstance(event, AnswerEvent):
        return {
            "type": "answer",
            "text": event.text,
            "finish": event.finish,
            "images": image_refs(session_id, list(event.images), base),
            "steps": tool_steps(event.steps, session_id, base),
        }
    raise TypeError(f"not an agent event: {type(event).__name__}")


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event (a `data:` line and a blank line)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()
