"""The tool-call protocol: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, several per reply.

This module turns a controller's reply text into the calls it makes and the mistakes it made writing them
(unparseable JSON, a missing name, arguments that are not an object, an unclosed tag), and hides call markup
from streamed text. It knows nothing about tools, images or models: checking a call against a tool's schema is
the loop's job.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
# Text the model may write when it imagines the result of its own call; generation stops there.
STOP_STRINGS = ["<tool_response>"]

_EXAMPLE = '<tool_call>{"name": "TOOL", "arguments": {"ARG": VALUE}}</tool_call>'


@dataclass
class ToolCall:
    """One call the model made: a tool name and its arguments."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The call as the JSON object of the protocol."""
        return {"name": self.name, "arguments": self.arguments}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToolCall:
        """Rebuild a call from `to_dict` output."""
        return cls(name=data["name"], arguments=dict(data.get("arguments") or {}))

    def render(self) -> str:
        """The call in the protocol's text form."""
        return f"{CALL_OPEN}{json.dumps(self.to_dict(), ensure_ascii=False)}{CALL_CLOSE}"

    def short(self) -> str:
        """A one-line human view: `name(key=value, ...)`."""
        args = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in self.arguments.items())
        return f"{self.name}({args})"


@dataclass
class ParsedReply:
    """A reply split into its visible text, the calls it makes and the mistakes in writing them."""

    text: str
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def parse_reply(reply: str) -> ParsedReply:
    """Split `reply` into visible text, well-formed calls and actionable messages for malformed ones.

    The JSON of a call is read with a JSON decoder, so a string inside it may contain anything, the closing
    tag included; only when it does not parse is the call taken to end at the next closing tag."""
    calls: list[ToolCall] = []
    errors: list[str] = []
    visible: list[str] = []
    pos = 0
    while True:
        start = reply.find(CALL_OPEN, pos)
        if start < 0:
            visible.append(reply[pos:])
            break
        visible.append(reply[pos:start])
        body_start = start + len(CALL_OPEN)
        end = _json_call_end(reply, body_start)
        if end is not None:
            call, error = parse_call(reply[body_start:end])
            pos = reply.index(CALL_CLOSE, end) + len(CALL_CLOSE)
        else:
            close = reply.find(CALL_CLOSE, body_start)
            if close < 0:
                snippet = reply[body_start:].strip()[:80]
                errors.append(
                    f"a tool call was opened but not closed: {CALL_OPEN}{snippet!s}... ; "
                    f"end every call with {CALL_CLOSE}, e.g. {_EXAMPLE}"
                )
                break
            call, error = parse_call(reply[body_start:close])
            pos = close + len(CALL_CLOSE)
        if call is not None:
            calls.append(call)
        else:
            errors.append(error)
    return ParsedReply(text="".join(visible).strip(), calls=calls, errors=errors)


_DECODER = json.JSONDecoder()


def _json_call_end(text: str, start: int) -> int | None:
    """Where the JSON value starting at `start` ends, when it parses and the closing tag follows it."""
    begin = len(text) - len(text[start:].lstrip())
    try:
        _, end = _DECODER.raw_decode(text, begin)
    except json.JSONDecodeError:
        return None
    rest = text[end:]
    return end if rest.lstrip().startswith(CALL_CLOSE) else None


def parse_call(body: str) -> tuple[ToolCall | None, str]:
    """Parse the JSON inside one call's tags; return (call, "") or (None, what is wrong and how to write it)."""
    body = body.strip()
    try:
        data = json.loads(body)
    except json.JSONDecodeError as err:
        return (
            None,
            f"could not parse the tool call {_clip(body)!r}: {err.msg} at character {err.pos}; write {_EXAMPLE}",
        )
    if not isinstance(data, dict):
        return None, f"a tool call must be a JSON object, got {type(data).__name__}; write {_EXAMPLE}"
    name = data.get("name")
    if not isinstance(name, str) or not name:
        return None, f'the tool call {_clip(body)!r} has no "name" string; write {_EXAMPLE}'
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string (OpenAI style)
        with contextlib.suppress(json.JSONDecodeError):
            arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        return None, f'the "arguments" of tool {name!r} must be a JSON object, got {json.dumps(arguments)}'
    return ToolCall(name=name, arguments=arguments), ""


def _clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[:n] + "..."


class CallTextFilter:
    """Streams a reply's text with the call markup left out, holding back what may be the start of a tag."""

    def __init__(self) -> None:
        self._buffer = ""
        self._inside = False

    def push(self, delta: str) -> str:
        """Feed a text delta; return the part that is safe to show now."""
        self._buffer += delta
        shown: list[str] = []
        while True:
            if self._inside:
                end = self._buffer.find(CALL_CLOSE)
                if end < 0:
                    return "".join(shown)
                self._buffer = self._buffer[end + len(CALL_CLOSE) :]
                self._inside = False
                continue
            start = self._buffer.find(CALL_OPEN)
            if start >= 0:
                shown.append(self._buffer[:start])
                self._buffer = self._buffer[start + len(CALL_OPEN) :]
                self._inside = True
                continue
            keep = _partial_suffix(self._buffer, CALL_OPEN)
            cut = len(self._buffer) - keep
            shown.append(self._buffer[:cut])
            self._buffer = self._buffer[cut:]
            return "".join(shown)

    def flush(self) -> str:
        """What is left at the end of a reply (an unclosed call stays hidden)."""
        rest, self._buffer = ("" if self._inside else self._buffer), ""
        return rest


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
