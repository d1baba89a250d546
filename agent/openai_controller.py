"""`OpenAIController`: a controller served by any OpenAI-compatible chat endpoint (vLLM, Ollama, llama.cpp server).

Plain HTTP (urllib): `POST {base_url}/chat/completions` with `stream: true`, reading server-sent events.

What goes over the wire:
- A user turn of text only is sent as a plain string (`"content": "..."`); one with images as a list of parts,
  images as base64 PNG data URLs in `image_url` parts, in the order the messages show them. System and assistant
  messages are plain strings. Consecutive user messages are merged for servers whose templates insist on
  alternating roles.
- `send_images=False` (text-only servers, e.g. a llama.cpp server without a vision projector): no image is sent;
  each image part becomes the text `[image img_N]` (the handle of the label before it), so the model can still
  pass the image to tools by handle.
- By default the tool-call protocol stays in text (the model writes `<tool_call>...</tool_call>`), so `tool`
  messages are sent as user messages wrapped in `<tool_response>` (the chat API's `tool` role takes neither
  images nor calls the server did not issue). With `native_tools=True` (servers whose chat templates render
  `tools`, e.g. vLLM with a tool parser, llama.cpp with `--jinja`) the schemas go in the request's `tools`, the
  model's `tool_calls` (whole or as stream deltas) come back as the protocol's `<tool_call>` text (so the agent
  loop parses them as any other call), earlier calls are sent as assistant `tool_calls` and their results as
  `tool` messages with the matching `tool_call_id` (images a tool made follow in a user message).

Failures raise `ControllerError` naming the server and what happened: an HTTP error status, an unreachable
server, a connection lost or timed out mid-stream, an error event in the stream, a chunk that is not JSON, or a
stream that ends without its closing `data: [DONE]`. An unreachable or crashed model is an infrastructure
failure, never an empty answer.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

from PIL import Image

from .controllers import Messages, generate_from_stream
from .protocol import CALL_CLOSE, CALL_OPEN, ToolCall, parse_reply

logger = logging.getLogger(__name__)

_HANDLE_LABEL = re.compile(r"(\w+):\s*$")  # the "img_0:" text part that precedes an image part


class ControllerError(RuntimeError):
    """The remote controller could not be reached or refused the request."""


def image_data_url(image: Image.Image) -> str:
    """A PNG data URL of `image`."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _convert_parts(
    content: Any, pending: list[Image.Image], send_images: bool, counter: list[int]
) -> list[dict[str, Any]]:
    """A message's content as chat API parts; image parts take `pending` images in order."""
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    converted: list[dict[str, Any]] = []
    for part in parts:
        kind = part.get("type")
        if kind == "text":
            converted.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            image = part.get("image")
            if image is None:
                if not pending:
                    raise ValueError("more image parts in the messages than images given")
                image = pending.pop(0)
            if send_images:
                converted.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
            else:  # a text-only server: the image's handle stands in for it
                label = (
                    _HANDLE_LABEL.search(converted[-1]["text"])
                    if converted and converted[-1]["type"] == "text"
                    else None
                )
                handle = label.group(1) if label else f"image {counter[0]}"
                converted.append({"type": "text", "text": f"[{handle}]"})
            counter[0] += 1
        else:
            raise ValueError(f"unknown content part type {kind!r}")
    return converted


def _text_of(parts: list[dict[str, Any]]) -> str:
    return "".join(p["text"] for p in parts if p["type"] == "text")


def _simplify(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text-only parts as one plain string (what every server takes); parts with images as they are."""
    if all(p["type"] == "text" for p in parts):
        return _text_of(parts)
    merged: list[dict[str, Any]] = []
    for part in parts:  # adjacent text parts joined: fewer, larger parts
        if part["type"] == "text" and merged and merged[-1]["type"] == "text":
            merged[-1] = {"type": "text", "text": merged[-1]["text"] + part["text"]}
        else:
            merged.append(part)
    return merged


def to_openai_messages(
    messages: Messages,
    images: Sequence[Image.Image] | None,
    send_images: bool = True,
    native_tools: bool = False,
) -> list[dict[str, Any]]:
    """Messages in the chat API's shape (see the module docstring): user text as strings, images as data URLs
    or handles, tool results as user messages or, with `native_tools`, as `tool` messages."""
    pending = list(images or [])
    counter = [0]
    out: list[dict[str, Any]] = []
    user: list[dict[str, Any]] | None = None  # parts of the user message being built
    call_ids: list[str] = []  # ids of the last assistant message's native calls not yet answered
    issued = 0  # native calls so far, for their ids

    def close_user() -> None:
        nonlocal user
        if user is not None:
            out.append({"role": "user", "content": _simplify(user)})
            user = None

    for message in messages:
        role = message["role"]
        converted = _convert_parts(message.get("content") or "", pending, send_images, counter)
        if role == "tool" and native_tools and call_ids:
            first = next((i for i, p in enumerate(converted) if p["type"] != "text"), len(converted))
            if 0 < first < len(converted) and _HANDLE_LABEL.search(converted[first - 1]["text"]):
                first -= 1
            # the tool role takes text only: the images a tool made follow, with their labels, in one user
            # message after the results of all the calls (which must come right after the assistant's calls)
            out.append(
                {"role": "tool", "tool_call_id": call_ids.pop(0), "content": _text_of(converted[:first])}
            )
            if first < len(converted):
                user = (user or [{"type": "text", "text": "Images the tools made:\n"}]) + converted[first:]
            continue
        if role == "tool":
            role = "user"
            converted = [
                {"type": "text", "text": "<tool_response>\n"},
                *converted,
                {"type": "text", "text": "\n</tool_response>"},
            ]
        if role == "user":
            user = (user or []) + converted
            continue
        close_user()
        text = _text_of(converted)
        if role == "assistant" and native_tools and CALL_OPEN in text:
            reply = parse_reply(text)
            calls = []
            call_ids = []
            for call in reply.calls:
                issued += 1
                call_ids.append(f"call_{issued}")
                arguments = json.dumps(call.arguments, ensure_ascii=False)
                calls.append(
                    {
                        "id": call_ids[-1],
                        "type": "function",
                        "function": {"name": call.name, "arguments": arguments},
                    }
                )
            if calls:
                out.append({"role": "assistant", "content": reply.text or None, "tool_calls": calls})
                continue
        if role in ("system", "assistant"):  # text only: the widest server support
            call_ids = []
            out.append({"role": role, "content": text})
        else:
            raise ValueError(f"unknown message role {role!r}; roles are system, user, assistant, tool")
    close_user()
    if pending:
        raise ValueError(f"{len(pending)} image(s) given beyond the image parts of the messages")
    return out


class OpenAIController:
    """A chat model behind an OpenAI-compatible HTTP endpoint."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout: float = 120.0,
        extra_body: dict[str, Any] | None = None,
        send_images: bool = True,
        native_tools: bool = False,
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key or (os.environ.get(api_key_env) if api_key_env else None)
        self.timeout = timeout
        self.extra_body = dict(extra_body or {})
        for option, value in (("send_images", send_images), ("native_tools", native_tools)):
            if not isinstance(value, bool):
                raise TypeError(f"option {option!r} must be true or false, got {value!r}")
        self.send_images = send_images
        self.native_tools = native_tools
        # the agent loop passes tool schemas through tools= when this is true; else they go in the system prompt
        self.supports_tool_template = native_tools

    @property
    def url(self) -> str:
        """The chat completions URL."""
        return f"{self.base_url}/chat/completions"

    def request_body(self, messages: Messages, images: Sequence[Image.Image] | None, **options: Any) -> dict:
        """The JSON body of a chat completion request."""
        if options.get("logits_processor"):
            raise ValueError(
                "constrained decoding needs a local controller (logits processors cannot go over HTTP)"
            )
        do_sample = options.get("do_sample", False)
        body: dict[str, Any] = {
            "model": self.model,
            "messages": to_openai_messages(messages, images, self.send_images, self.native_tools),
            "max_tokens": options.get("max_new_tokens", 256),
            "temperature": options.get("temperature", 1.0) if do_sample else 0.0,
            "top_p": options.get("top_p", 1.0) if do_sample else 1.0,
            "stream": True,
        }
        if options.get("stop"):
            body["stop"] = list(options["stop"])
        if self.native_tools and options.get("tools"):
            body["tools"] = list(options["tools"])
        body.update(self.extra_body)
        return body

    def stream(
        self, messages: Messages, images: Sequence[Image.Image] | None = None, **options: Any
    ) -> Iterator[str]:
        """Yield the reply's text deltas as the server streams them; raise ControllerError on any failure."""
        body = json.dumps(self.request_body(messages, images, **options)).encode()
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        where = f"controller {self.model!r} at {self.url}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")[:500]
            raise ControllerError(f"{where}: HTTP {err.code} {err.reason}: {detail}") from None
        except urllib.error.URLError as err:
            raise ControllerError(f"{where}: cannot reach the controller: {err.reason}") from None
        except (http.client.HTTPException, OSError) as err:  # e.g. the server closed without a response
            raise ControllerError(f"{where}: no response ({type(err).__name__}: {err})") from None
        with response:
            yield from _read_events(response, where, self.timeout)

    def generate(
        self, messages: Messages, images: Sequence[Image.Image] | None = None, **options: Any
    ) -> str:
        """The reply's whole text."""
        on_token = options.pop("on_token", None)
        return generate_from_stream(self.stream(messages, images, **options), on_token)


def render_tool_call(name: str, arguments: Any) -> str:
    """A native call in the protocol's text form; arguments the model wrote as a JSON string stay as written
    when they do not parse, so the agent loop reports the mistake to the model."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return f"{CALL_OPEN}{json.dumps({'name': name, 'arguments': arguments})}{CALL_CLOSE}"
    if isinstance(arguments, dict):
        return ToolCall(name=name, arguments=arguments).render()
    return f"{CALL_OPEN}{json.dumps({'name': name, 'arguments': arguments})}{CALL_CLOSE}"


class _ToolCallDeltas:
    """Native `tool_calls` of one reply, put together from stream deltas by their index."""

    def __init__(self) -> None:
        self.calls: dict[int, dict[str, str]] = {}

    def add(self, deltas: list[dict[str, Any]]) -> None:
        """Merge one chunk's `delta.tool_calls`."""
        for position, delta in enumerate(deltas):
            index = delta.get("index", position)
            call = self.calls.setdefault(index, {"name": "", "arguments": ""})
            function = delta.get("function") or {}
            call["name"] += function.get("name") or ""
            call["arguments"] += function.get("arguments") or ""

    def render(self, where: str) -> str:
        """The calls as protocol text, in index order."""
        out = []
        for index in sorted(self.calls):
            call = self.calls[index]
            if not call["name"]:
                raise ControllerError(f"{where}: the stream sent tool call {index} without a function name")
            out.append(render_tool_call(call["name"], call["arguments"]))
        return "".join(out)


def _read_events(response: Any, where: str, timeout: float) -> Iterator[str]:
    """Text deltas from a server-sent-event stream of chat completion chunks (or one plain JSON answer)."""
    content_type = response.headers.get("Content-Type", "")
    if "text/event-stream" not in content_type:  # a server that ignores stream=true
        yield from _read_plain(response, where)
        return
    chunks = chars = 0
    calls = _ToolCallDeltas()
    event = "message"
    try:
        for raw in response:
            line = raw.decode("utf-8", "replace").strip()
            if line.startswith("event:"):
                event = line[len("event:") :].strip()
                continue
            if not line.startswith("data:"):
                if not line:
                    event = "message"
                continue
            payload = line[len("data:") :].strip()
            if payload == "[DONE]":
                if calls.calls:
                    yield calls.render(where)
                return
            try:
                chunk = json.loads(payload)
            except json.JSONDecodeError:
                raise ControllerError(f"{where}: a stream chunk is not JSON: {payload[:200]!r}") from None
            if event == "error" or (isinstance(chunk, dict) and "error" in chunk):
                error = chunk.get("error", chunk) if isinstance(chunk, dict) else chunk
                message = error.get("message", error) if isinstance(error, dict) else error
                raise ControllerError(
                    f"{where}: the server reported an error mid-stream after {chunks} chunk(s): {message}"
                )
            chunks += 1
            choices = chunk.get("choices") or []
            if not choices:
                continue
            delta = choices[0].get("delta") or {}
            if delta.get("tool_calls"):
                calls.add(delta["tool_calls"])
            text = delta.get("content")
            if text:
                chars += len(text)
                yield text
    except TimeoutError:
        raise ControllerError(
            f"{where}: no data for {timeout:g} s mid-stream after {chunks} chunk(s) ({chars} characters)"
        ) from None
    except (http.client.HTTPException, OSError) as err:
        raise ControllerError(
            f"{where}: the connection was lost mid-stream after {chunks} chunk(s) ({chars} characters): "
            f"{type(err).__name__}: {err}"
        ) from None
    raise ControllerError(
        f"{where}: the stream ended without 'data: [DONE]' after {chunks} chunk(s) ({chars} characters): "
        "the server closed the connection before finishing the reply (did it crash? see its log)"
    )


def _read_plain(response: Any, where: str) -> Iterator[str]:
    """The text of one non-streamed JSON answer (with native tool calls as protocol text)."""
    raw = response.read().decode("utf-8", "replace")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise ControllerError(
            f"{where}: the answer is neither an event stream nor JSON: {raw[:200]!r}"
        ) from None
    if not isinstance(data, dict) or "error" in data or not data.get("choices"):
        detail = data.get("error", data) if isinstance(data, dict) else data
        raise ControllerError(f"{where}: the answer has no choices: {str(detail)[:300]}")
    message = data["choices"][0].get("message") or {}
    text = message.get("content") or ""
    text += "".join(
        render_tool_call(
            (c.get("function") or {}).get("name", ""), (c.get("function") or {}).get("arguments", "")
        )
        for c in message.get("tool_calls") or []
    )
    if text:
        yield text
