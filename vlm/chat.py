"""Chat rendering: a conversation becomes `(input_ids, labels)` in one pass.

Messages are dicts with a role ("system", "user", "assistant" or "tool") and a content that is a string or a
list of parts, `{"type": "text", "text": ...}` or `{"type": "image"}`; images are taken in order of appearance
from the `images` list (a part may also carry its image inline under "image"). Every image becomes a run of
image-placeholder tokens as long as the vision features the model will put there.

Only assistant messages are supervised (their text, tool calls included, and the end-of-turn token); system,
user and tool messages never are. The same function serves inference (`add_generation_prompt=True`) and
training. Two renderers:

- `ChatMLRenderer` tokenizes the pieces of the ChatML format one by one and concatenates ids, so labels are exact
  by construction (no re-tokenizing strings to guess masks). It is the native format of toolvlm models, and
  `chatml_template()` is the same format as a Jinja chat template for the HF processor.
- `TemplateRenderer` drives any other HF chat template (llava-hf checkpoints): it renders the string once,
  tokenizes it once with character offsets, and supervises the tokens inside the assistant messages' spans.

This module knows tokenizers and message shapes, not models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .images import ImageLike, load_image

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class RenderedChat:
    """Token ids and labels of a conversation, with the images in the order of their token runs."""

    input_ids: list[int]
    labels: list[int]
    images: list[Image.Image] = field(default_factory=list)
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each image's tokens

    def __len__(self) -> int:
        return len(self.input_ids)


def message_parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The content of a message as a list of parts, validating role and part types."""
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"unknown message role {role!r}; roles are {', '.join(ROLES)}")
    content = message.get("content", "")
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    parts = []
    for part in content:
        kind = part.get("type")
        if kind not in ("text", "image"):
            raise ValueError(f"unknown content part type {kind!r} in a {role} message; use 'text' or 'image'")
        parts.append(part)
    return parts


def collect_images(
    messages: Sequence[dict[str, Any]], images: Sequence[ImageLike] | None
) -> list[Image.Image]:
    """The images of a conversation in order of appearance; parts carry them inline or take the next in `images`."""
    pending = list(images or [])
    n_placeholders = sum(
        1 for m in messages for p in message_parts(m) if p["type"] == "image" and p.get("image") is None
    )
    if n_placeholders != len(pending):
        raise ValueError(
            f"image parts and images do not match: the messages have {n_placeholders} image parts "
            f"without an inline image, {len(pending)} images were given"
        )
    found = []
    for message in messages:
        for part in message_parts(message):
            if part["type"] == "image":
                inline = part.get("image")
                found.append(load_image(inline if inline is not None else pending.pop(0)))
    return found


def message_text(message: dict[str, Any]) -> str:
    """The text of a message with its image parts left out."""
    return "".join(p["text"] for p in message_parts(message) if p["type"] == "text")


class ChatMLRenderer:
    """Renders the ChatML format (`<|im_start|>role\\n...<|im_end|>\\n`) piece by piece."""

    def __init__(
        self,
        tokenizer: Any,
        image_token: str,
        image_seq_len: int,
        start_token: str = "<|im_start|>",
        end_token: str = "<|im_end|>",
    ):
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.image_token_id = self._single_id(image_token)
        self.image_seq_len = image_seq_len
        self.start_token, self.end_token = start_token, end_token
        self.end_ids = [self._single_id(end_token)]
        self.newline_ids = self.encode("\n")

    def _single_id(self, token: str) -> int:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{token!r} must be a single token of the tokenizer, it encodes to {ids}")
        return ids[0]

    def encode(self, text: str) -> list[int]:
        """Token ids of a piece of text, without special tokens added around it."""
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        images: Sequence[ImageLike] | None = None,
        add_generation_prompt: bool = False,
    ) -> RenderedChat:
        """Token ids and labels of `messages`; labels are IGNORE_INDEX outside assistant messages."""
        out = RenderedChat([], [], collect_images(messages, images))
        image_iter = iter(out.images)

        def emit(ids: list[int], supervised: bool) -> None:
            out.input_ids.extend(ids)
            out.labels.extend(ids if supervised else [IGNORE_INDEX] * len(ids))

        for message in messages:
            supervised = message["role"] == "assistant" and message.get("supervise", True)
            emit(self.encode(f"{self.start_token}{message['role']}\n"), False)
            for part in message_parts(message):
                if part["type"] == "text":
                    emit(self.encode(part["text"]), supervised)
                else:
                    next(image_iter)
                    start = len(out.input_ids)
                    emit([self.image_token_id] * self.image_seq_len, False)
                    out.image_spans.append((start, len(out.input_ids)))
            emit(self.end_ids, supervised)
            emit(self.newline_ids, False)
        if add_generation_prompt:
            emit(self.encode(f"{self.start_token}assistant\n"), False)
        return out


def chatml_template(image_token: str = "<image>") -> str:
    """The ChatML format of `ChatMLRenderer` as a Jinja chat template for HF processors and tokenizers."""
    return (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{- '" + image_token + "' -}}"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


class TemplateRenderer:
    """Renders with a checkpoint's own Jinja chat template; assistant spans are found by character offsets."""

    def __init__(self, tokenizer: Any, chat_template: str, image_token: str, image_seq_len: int):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_token = image_token
        ids = tokenizer.encode(image_token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"image token {image_token!r} must be a single token, it encodes to {ids}")
        self.image_token_id = ids[0]
        self.image_seq_len = image_seq_len

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        images: Sequence[ImageLike] | None = None,
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
    ) -> RenderedChat:
        """Token ids and labels of `messages` under the checkpoint's chat template."""
        found = collect_images(messages, images)
        plain = [_template_message(m) for m in messages]
        text = self.tokenizer.apply_chat_template(
            plain, chat_template=self.chat_template, tokenize=False,
            add_generation_prompt=add_generation_prompt, tools=tools,
        )  # fmt: skip
        spans, cursor = [], 0
        for message in plain:
            if message["role"] != "assistant" or not message.get("supervise", True):
                continue
            body = message_text(message)
            start = text.find(body, cursor)
            if start < 0:
                raise ValueError(
                    "the chat template does not render assistant messages verbatim; cannot label them"
                )
            cursor = start + len(body)
            end_text = self.tokenizer.eos_token or ""
            after = len(text[cursor:]) - len(text[cursor:].lstrip())
            if end_text and text.startswith(end_text, cursor + after):  # the end-of-turn token is supervised
                cursor += after + len(end_text)
            spans.append((start, cursor))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        out = RenderedChat([], [], found)
        n_image_tokens = 0
        for token_id, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
            if token_id == self.image_token_id:
                start = len(out.input_ids)
                out.input_ids.extend([token_id] * self.image_seq_len)
                out.labels.extend([IGNORE_INDEX] * self.image_seq_len)
                out.image_spans.append((start, len(out.input_ids)))
                n_image_tokens += 1
                continue
            supervised = b > a and any(a < e and b > s for s, e in spans)  # tokens overlapping a span
            out.input_ids.append(token_id)
            out.labels.append(token_id if supervised else IGNORE_INDEX)
        if n_image_tokens != len(found):
            raise ValueError(
                f"image placeholders and images do not match: the rendered chat has {n_image_tokens} "
                f"{self.image_token!r} tokens, the messages carry {len(found)} images"
            )
        return out


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message in the shape HF chat templates expect (content as a list of typed parts, no inline images)."""
    parts = [
        {"type": "text", "text": p["text"]} if p["type"] == "text" else {"type": "image"}
        for p in message_parts(message)
    ]
    plain = {k: v for k, v in message.items() if k != "content"}
    plain["content"] = parts
    return plain
