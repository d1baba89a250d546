"""Controllers: what the agent loop asks for the next reply.

`Controller` is the surface the loop needs (`generate`, `stream`, `supports_tool_template`); `toolvlm.vlm.VLM`
has it. Implementations here:

- `ScriptedController`: replies enqueued in advance, every call recorded (messages, images, options), so tests
  can drive the loop and assert what the controller saw.
- `LocalVLMController`: a `toolvlm.vlm.VLM` in this process (imported lazily).
- `OpenAIController` (openai_controller.py): any OpenAI-compatible chat endpoint.

This module knows messages and text; it knows nothing of tools or sessions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image

logger = logging.getLogger(__name__)

Messages = Sequence[dict[str, Any]]


@runtime_checkable
class Controller(Protocol):
    """A chat model that sees images: the generate/stream surface of `toolvlm.vlm.VLM`.

    `messages` are {"role": "system"|"user"|"assistant"|"tool", "content": str | parts}, parts being
    {"type": "text", "text": ...} or {"type": "image"}; image parts take `images` in order of appearance.
    `tools` carries function schemas for backends whose chat template renders them (`supports_tool_template`).
    """

    supports_tool_template: bool

    def stream(
        self,
        messages: Messages,
        images: Sequence[Image.Image] | None = None,
        *,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        logits_processor: Any = None,
        tools: list[dict] | None = None,
    ) -> Iterator[str]:
        """Yield the reply's text deltas."""
        ...

    def generate(
        self,
        messages: Messages,
        images: Sequence[Image.Image] | None = None,
        *,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        on_token: Callable[[str], None] | None = None,
        logits_processor: Any = None,
        tools: list[dict] | None = None,
    ) -> str:
        """The reply's whole text; `on_token` receives each delta."""
        ...


def generate_from_stream(stream: Iterator[str], on_token: Callable[[str], None] | None = None) -> str:
    """Join a stream of deltas into the whole text, passing each delta to `on_token`."""
    pieces = []
    for delta in stream:
        pieces.append(delta)
        if on_token is not None:
            on_token(delta)
    return "".join(pieces)


@dataclass
class ControllerCall:
    """What a scripted controller was asked: messages, images and generation options."""

    messages: list[dict[str, Any]]
    images: list[Image.Image]
    options: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        """All text of the messages, for quick assertions."""
        out = []
        for m in self.messages:
            content = m.get("content")
            if isinstance(content, str):
                out.append(content)
            else:
                out.extend(p.get("text", "") for p in content or [] if p.get("type") == "text")
        return "\n".join(out)


Reply = str | BaseException | Callable[[list[dict[str, Any]], list[Image.Image]], str]


class ScriptedController:
    """Replies enqueued in advance; records every call. A reply may be a string, an exception to raise, or a
    function of (messages, images) returning a string."""

    def __init__(
        self,
        replies: Sequence[Reply] = (),
        *,
        supports_tool_template: bool = False,
        chunk_size: int = 4,
        tokenizer: Any = None,
    ):
        self.replies: list[Reply] = list(replies)
        self.calls: list[ControllerCall] = []
        self.supports_tool_template = supports_tool_template
        self.chunk_size = chunk_size
        self.tokenizer = tokenizer

    def enqueue(self, *replies: Reply) -> None:
        """Add replies to the end of the script."""
        self.replies.extend(replies)

    def stream(
        self, messages: Messages, images: Sequence[Image.Image] | None = None, **options: Any
    ) -> Iterator[str]:
        """Yield the next scripted reply in chunks of `chunk_size` characters."""
        call = ControllerCall([dict(m) for m in messages], list(images or []), dict(options))
        self.calls.append(call)
        if not self.replies:
            raise RuntimeError(f"ScriptedController: no reply left for call {len(self.calls)}")
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        text = reply(call.messages, call.images) if callable(reply) else reply
        stop = [s for s in options.get("stop") or [] if s in text]
        if stop:
            text = text[: min(text.find(s) for s in stop)]
        for i in range(0, len(text), self.chunk_size):
            yield text[i : i + self.chunk_size]

    def generate(
        self, messages: Messages, images: Sequence[Image.Image] | None = None, **options: Any
    ) -> str:
        """The next scripted reply, whole."""
        on_token = options.pop("on_token", None)
        return generate_from_stream(self.stream(messages, images, **options), on_token)


class LocalVLMController:
    """A `toolvlm.vlm.VLM` running in this process."""

    def __init__(self, vlm: Any):
        self.vlm = vlm

    @classmethod
    def load(
        cls, model: str | dict, device: str = "cpu", dtype: str = "auto", decode_kernels: str = "exact"
    ) -> LocalVLMController:
        """Load a VLM (folder, hub id, or spec dict) with `toolvlm.vlm.load_vlm`; adapters are merged;
        `decode_kernels` picks the LLaVA engine's one-token step kernels (`toolvlm.vlm.fast_decode.KERNELS`)."""
        from toolvlm.vlm import load_vlm

        logger.info("loading controller %s on %s (%s)", model, device, dtype)
        vlm = load_vlm(model, dtype=dtype, device=device, merge=True)
        if vlm.is_llava:
            vlm.engine.decode_kernels = decode_kernels
        elif decode_kernels != "exact":
            logger.warning(
                "decode_kernels=%r ignored: only the LLaVA engine has a decode step", decode_kernels
            )
        return cls(vlm)

    @property
    def supports_tool_template(self) -> bool:
        """True when the VLM's chat template takes `tools=`."""
        return bool(self.vlm.supports_tool_template)

    @property
    def tokenizer(self) -> Any:
        """The VLM's tokenizer (for constrained decoding)."""
        return self.vlm.tokenizer

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end a reply."""
        return list(getattr(self.vlm, "stop_token_ids", []) or [])

    def stream(
        self, messages: Messages, images: Sequence[Image.Image] | None = None, **options: Any
    ) -> Iterator[str]:
        """Yield text deltas from the VLM."""
        options.pop("on_token", None)
        return self.vlm.stream(messages, images, **options)

    def generate(
        self, messages: Messages, images: Sequence[Image.Image] | None = None, **options: Any
    ) -> str:
        """The VLM's whole reply."""
        return self.vlm.generate(messages, images, **options)

    def reset(self) -> None:
        """Forget the VLM's caches (a new conversation)."""
        reset = getattr(self.vlm, "reset_cache", None)
        if reset is not None:
            reset()
