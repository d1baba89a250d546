"""A fast, stateless rule-based controller for serving tests and load benchmarks (no model runs).

`WorkflowController` reads the conversation it is given and answers the demo's four kinds of question the way
the trained controller is meant to: a description from itself, the grounding tool for "box/find/where", the
counter for "how many/count/number of", the generator (twice the people) for "generate/similar". After a tool
result it answers with that result's text. It keeps no state between calls, so one instance can serve every
session and worker thread at once (`thread_safe = True`). It knows message dicts, not models or HTTP.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

from PIL import Image

HANDLE = re.compile(r"\bimg_\d+\b")
OBJECT_WORDS = ("tree", "person", "people", "dog", "car", "house", "cloud", "sun", "ball", "bench", "bird")


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(
        p.get("text", "") for p in content or [] if isinstance(p, dict) and p.get("type") == "text"
    )


def _call(name: str, **arguments: Any) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def _object(question: str, default: str) -> str:
    words = re.findall(r"[a-z]+", question.lower())
    for word in words:
        if word in OBJECT_WORDS:
            return "person" if word == "people" else word
    return default


class WorkflowController:
    """Replies decided by rules from the last message; see the module docstring."""

    thread_safe = True
    supports_tool_template = False

    def __init__(self, chunk_size: int = 8, generator_steps: int | None = None):
        self.chunk_size = chunk_size
        self.generator_steps = (
            generator_steps  # denoising steps it asks the generator for (None: its default)
        )

    def reply(self, messages: Sequence[dict[str, Any]]) -> str:
        """The whole reply to `messages` (the last one decides)."""
        if not messages:
            raise ValueError("WorkflowController: no messages")
        last = messages[-1]
        if last.get("role") == "tool":
            content = last.get("content")
            first = (
                content
                if isinstance(content, str)
                else next(
                    (
                        p.get("text", "")
                        for p in content or []
                        if isinstance(p, dict) and p.get("type") == "text"
                    ),
                    "",
                )
            )
            result, _, made = first.partition("\nNew images: ")
            return f"Done: {result.strip()}" + (f" (new image: {made.strip()})" if made else "")
        question = _text(last)
        handles = [h for m in messages if m.get("role") in ("user", "tool") for h in HANDLE.findall(_text(m))]
        user_handles = [h for m in messages if m.get("role") == "user" for h in HANDLE.findall(_text(m))]
        image = user_handles[-1] if user_handles else (handles[-1] if handles else None)
        q = question.lower()
        if image is None:
            return "Please give me an image first (upload or paste one)."
        if re.search(r"\b(box|boxes|find|where|locate)\b", q):
            return _call("grounding", image=image, phrase=_object(q, "tree"))
        if re.search(r"\b(how many|count|number of)\b", q):
            return _call("counter", image=image, phrase=_object(q, "person"))
        if re.search(r"\b(generate|similar|draw|make)\b", q):
            factor = 2 if re.search(r"\b(double|twice)\b", q) else 1
            options = {"steps": self.generator_steps} if self.generator_steps else {}
            return _call("generator", image=image, changes={_object(q, "person"): factor}, **options)
        return f"I see {image}: a scene; ask me to box, count or regenerate what is in it."

    def stream(
        self, messages: Sequence[dict[str, Any]], images: Sequence[Image.Image] | None = None, **options: Any
    ) -> Iterator[str]:
        """Yield the reply in chunks of `chunk_size` characters."""
        text = self.reply(messages)
        for i in range(0, len(text), self.chunk_size):
            yield text[i : i + self.chunk_size]

    def generate(
        self, messages: Sequence[dict[str, Any]], images: Sequence[Image.Image] | None = None, **options: Any
    ) -> str:
        """The whole reply."""
        return self.reply(messages)
