"""`OpenAIController`: a controller served by any OpenAI-compatible chat endpoint (vLLM, Ollama, llama.cpp server).

Plain HTTP (urllib): `POST {base_url}/chat/completions` with `stream: true`, reading server-sent events. Images
go as base64 PNG data URLs in `image_url` parts, in the order the messages show them. The tool-call protocol
stays in text (the model writes `<tool_call>...</tool_call>`), so `tool` messages are sent as user messages
wrapped in `<tool_response>` (the chat API's own `tool` role takes neither images nor calls it did not issue),
and consecutive user messages are merged for servers whose templates insist on alternating roles.

HTTP failures raise `ControllerError` with the server's message: an unreachable model is an infrastructure
failure, not a model mistake.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

from PIL import Image

from .controllers import Messages, generate_from_stream

logger = logging.getLogger(__name__)


class ControllerError(RuntimeError):
    """The remote controller could not be reached or refused the request."""


def image_data_url(image: Image.Image) -> str:
    """A PNG data URL of `image`."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def to_openai_messages(messages: Messages, images: Sequence[Image.Image] | None) -> list[dict[str, Any]]:
    """Messages in the chat API's shape: image parts as data URLs, tool results as user messages."""
    pending = list(images or [])
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        content = message.get("content") or ""
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        converted: list[dict[str, Any]] = []
        for part in parts:
            if part.get("type") == "image":
                image = part.get("image")
                if image is None:
                    if not pending:
                        raise ValueError("more image parts in the messages than images given")
                    image = pending.pop(0)
                converted.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
            elif part.get("type") == "text":
                converted.append({"type": "text", "text": part["text"]})
            else:
                raise ValueError(f"unknown content part type {part.get('type')!r}")
        if role == "tool":
            role = "user"
            converted = [
                {"type": "text", "text": "<tool_response>\n"},
                *converted,
                {"type": "text", "text": "\n</tool_response>"},
            ]
        if role in ("system", "assistant"):  # text only: the widest server support
            text = "".join(p["text"] for p in converted if p["type"] == "text")
            out.append({"role": role, "content": text})
        elif out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], list):
            out[-1]["content"].extend(converted)
        else:
            out.append({"role": "user", "content": converted})
    if pending:
        raise ValueError(f"{len(pending)} image(s) given beyond the image parts of the messages")
    return out


class OpenAIController:
    """A chat model behind an OpenAI-compatible HTTP endpoint."""

    supports_tool_template = False  # tool schemas go in the system prompt

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout: float = 120.0,
        extra_body: dict[str, Any] | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key or (os.environ.get(api_key_env) if api_key_env else None)
        self.timeout = timeout
        self.extra_body = dict(extra_body or {})

    def request_body(self, messages: Messages, images: Sequence[Image.Image] | None, **options: Any) -> dict:
        """The JSON body of a chat completion request."""
        if options.get("logits_processor"):
            raise ValueError(
                "constrained decoding needs a local controller (logits processors cannot go over HTTP)"
            )
        do_sample = options.get("do_sample", False)
        body: dict[str, Any] = {
            "model": self.model,
            "messages": to_openai_messages(messages, images),
            "max_tokens": options.get("max_new_tokens", 256),
            "temperature": options.get("temperature", 1.0) if do_sample else 0.0,
            "top_p": options.get("top_p", 1.0) if do_sample else 1.0,
            "stream": True,
        }
        if options.get("stop"):
            body["stop"] = list(options["stop"])
        body.update(self.extra_body)
        return body

    def stream(
        self, messages: Messages, images: Sequence[Image.Image] | None = None, **options: Any
    ) -> Iterator[str]:
        """Yield the reply's text deltas as the server streams them."""
        body = json.dumps(self.request_body(messages, images, **options)).encode()
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = f"{self.base_url}/chat/completions"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")[:500]
            raise ControllerError(f"{url}: HTTP {err.code}: {detail}") from None
        except urllib.error.URLError as err:
            raise ControllerError(f"{url}: cannot reach the controller: {err.reason}") from None
        with response:
            yield from _read_events(response, url)

    def generate(
        self, messages: Messages, images: Sequence[Image.Image] | None = None, **options: Any
    ) -> str:
        """The reply's whole text."""
        on_token = options.pop("on_token", None)
        return generate_from_stream(self.stream(messages, images, **options), on_token)


def _read_events(response: Any, url: str) -> Iterator[str]:
    """Text deltas from a server-sent-event stream of chat completion chunks (or one plain JSON answer)."""
    content_type = response.headers.get("Content-Type", "")
    if "text/event-stream" not in content_type:  # a server that ignores stream=true
        data = json.loads(response.read().decode("utf-8"))
        text = data["choices"][0]["message"].get("content") or ""
        if text:
            yield text
        return
    for raw in response:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            return
        chunk = json.loads(payload)
        if "error" in chunk:
            raise ControllerError(f"{url}: {chunk['error']}")
        choices = chunk.get("choices") or []
        if choices:
            delta = (choices[0].get("delta") or {}).get("content")
            if delta:
                yield delta
