"""Driving any `AutoModelForImageTextToText` checkpoint (Qwen2-VL, SmolVLM/Idefics3, ...) through its own parts.

Each such model has its own image tokens, position scheme and processor, so this backend renders with the
checkpoint's chat template (tool schemas through `tools=` where the template takes them) and generates with
transformers' `generate`, streaming through `TextIteratorStreamer`. The cached engine of `engine.py` is for the
LLaVA family only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import LogitsProcessorList, TextIteratorStreamer

from .chat import RenderedChat, _template_message, collect_images
from .engine import SamplingConfig
from .images import ImageLike


class UnsupportedProcessorError(ValueError):
    """A checkpoint whose processor cannot be built here."""


class GenericBackend:
    """Generation for image-text-to-text models through their processor and `model.generate`."""

    def __init__(self, model: torch.nn.Module, processor: Any):
        self.model = model
        self.processor = processor

    def _inputs(self, messages, images, tools, add_generation_prompt: bool = True):
        found = collect_images(messages, images)
        plain = [_template_message(m) for m in messages]
        text = self.processor.apply_chat_template(
            plain, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools
        )
        inputs = self.processor(text=[text], images=found or None, return_tensors="pt")
        return inputs.to(self.model.device), found

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        images: Sequence[ImageLike] | None,
        add_generation_prompt: bool,
        tools: list[dict] | None,
    ) -> RenderedChat:
        """Input ids for generation; training labels need a LLaVA-family model and are refused here."""
        if not add_generation_prompt and any(m["role"] == "assistant" for m in messages):
            raise NotImplementedError(
                f"training labels for {self.model.config.model_type} checkpoints are not supported: "
                "use a LLaVA-family model (toolvlm's own or llava-hf) for fine-tuning"
            )
        inputs, found = self._inputs(messages, images, tools, add_generation_prompt)
        ids = inputs["input_ids"][0].tolist()
        return RenderedChat(ids, [-100] * len(ids), found)

    def stream(
        self,
        messages: Sequence[dict[str, Any]],
        images: Sequence[ImageLike] | None,
        config: SamplingConfig,
        processors: LogitsProcessorList,
        tools: list[dict] | None,
        stop: Sequence[str] | None,
    ) -> Iterator[str]:
        """Yield text deltas from `model.generate` running in a worker thread."""
        inputs, _ = self._inputs(messages, images, tools)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(
            **inputs,
            streamer=streamer,
            max_new_tokens=config.max_new_tokens,
            do_sample=config.do_sample,
            logits_processor=processors or None,
            eos_token_id=config.stop_token_ids or None,
            stop_strings=list(stop) if stop else None,
            tokenizer=self.processor.tokenizer if stop else None,
        )
        if config.do_sample:
            kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k or None)
            if config.seed is not None:
                torch.manual_seed(config.seed)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as err:  # re-raised in the caller's thread below
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        text = ""
        for delta in streamer:
            text += delta
            if stop and any(s in text for s in stop):
                cut = min(text.find(s) for s in stop if s in text)
                keep = cut - (len(text) - len(delta))
                if keep > 0:
                    yield delta[:keep]
                break
            yield delta
        thread.join()
        if errors:
            raise errors[0]


def load_processor(source: str):
    """The checkpoint's processor with PIL image processing; image-only when its video part needs torchvision.

    Processors such as Qwen2-VL's declare a video processor, which transformers builds only with torchvision.
    Where torchvision is absent, the same processor class is loaded without its video attribute: images and text
    work exactly as before, and passing videos fails with transformers' own error.
    """
    import json
    from pathlib import Path

    import transformers
    from transformers import AutoProcessor, ProcessorMixin

    try:
        processor = AutoProcessor.from_pretrained(source, backend="pil")
        reason: object = f"AutoProcessor gave a {type(processor).__name__}, not a processor"
    except (
        AttributeError,
        ImportError,
        OSError,
        ValueError,
        TypeError,
    ) as err:  # e.g. video needs torchvision
        processor, reason = None, err
    if isinstance(processor, ProcessorMixin):
        return processor
    config_file = Path(source, "processor_config.json")
    name = json.loads(config_file.read_text()).get("processor_class") if config_file.is_file() else None
    cls = getattr(transformers, name, None) if name else None
    if cls is None or "video_processor" not in cls.get_attributes():
        raise UnsupportedProcessorError(f"cannot load the processor of {source}: {reason}")
    attributes = [a for a in cls.get_attributes() if a != "video_processor"]
    image_only = type(name, (cls,), {"get_attributes": classmethod(lambda _cls: list(attributes))})
    processor = image_only.from_pretrained(source, backend="pil")
    processor.video_processor = None
    logging.getLogger(__name__).info("loaded %s without its video processor (%s)", name, reason)
    return processor
