"""The `generator` tool: text-to-image, layout-to-image, and "a similar image" with changed object counts.

The mode follows from the arguments: a reference `image` -> similar image (the grounding tool finds the
objects named in `changes` and `objects`, layout.py edits the layout, the backend renders it); else `boxes` with
`phrases` -> layout-to-image; else `prompt` -> text-to-image. Backends are in image_backends.py. Seeded and
deterministic: the same arguments and seed give the same image.

Counts in the result are measured, not planned: with a counter tool (build_tools links the profile's counter),
the generated image of a similar-image or layout request is counted again for every object of the plan, and the
text reports both the planned and the counted figures; without one it says the figures are only planned.
"""

from __future__ import annotations

import logging
from typing import Any

from PIL import Image

from toolvlm.tools import imaging
from toolvlm.tools.base import MissingWeightsError, Tool, ToolInputError, ToolOutput
from toolvlm.tools.draw import BOX_SCHEMA
from toolvlm.tools.image_backends import make_backend
from toolvlm.tools.layout import Layout, edit_layout

log = logging.getLogger(__name__)

MAX_SIDE = 2048


class GeneratorTool(Tool):
    """Generate images from text, from a layout, or similar to a reference with changed counts."""

    name = "generator"
    description = (
        "Generate an image. Text-to-image: give 'prompt'. Layout-to-image: give 'boxes' [x0, y0, x1, y1] in "
        "pixels of the output and one phrase per box in 'phrases'. A similar image: give the reference 'image' "
        "and 'changes' in object counts, e.g. {\"person\": 2} doubles the people ('+3' adds three, '=10' sets "
        "ten; words work too: 'double', 'three more', 'exactly 10'); the other objects found in the reference "
        "are kept (only those in 'objects' when given)."
    )
    inputs = {
        "type": "object",
        "properties": {
            "prompt": {
                "type": "string",
                "description": "what to draw (may be left out in layout and similar-image modes)",
            },
            "image": {
                "type": "string",
                "format": "image",
                "description": "a reference image for a similar image",
            },
            "changes": {
                "type": "object",
                "additionalProperties": {"type": ["number", "string"]},
                "description": "count changes per object: a factor (2), '+N', '-N', '=N', or in words "
                "('twice as many', 'an extra 3', 'two fewer', 'exactly 10')",
            },
            "objects": {
                "type": "array",
                "items": {"type": "string"},
                "description": "other objects of the reference to find and keep",
            },
            "boxes": {
                "type": "array",
                "items": BOX_SCHEMA,
                "description": "layout boxes in pixels of the output",
            },
            "phrases": {
                "type": "array",
                "items": {"type": "string"},
                "description": "one phrase per layout box",
            },
            "seed": {
                "type": "integer",
                "description": "random seed (default 0); the same seed gives the same image",
            },
            "steps": {
                "type": "integer",
                "minimum": 1,
                "maximum": 1000,
                "description": "denoising steps (more is slower and finer)",
            },
            "width": {
                "type": "integer",
                "minimum": 8,
                "maximum": MAX_SIDE,
                "description": "output width in pixels",
            },
            "height": {
                "type": "integer",
                "minimum": 8,
                "maximum": MAX_SIDE,
                "description": "output height in pixels",
            },
        },
        "required": [],
    }

    def __init__(
        self,
        backend: str = "inhouse",
        model: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        grounding: Tool | None = None,
        counter: Tool | None = None,
    ) -> None:
        super().__init__(device=device, dtype=dtype)
        self.backend_name = backend
        options = {"guidance_scale": guidance_scale, "negative_prompt": negative_prompt}
        self.backend = make_backend(backend, model=model, device=device, dtype=dtype, **options)
        self.steps = steps
        self.grounding = grounding
        self.counter = counter

    def setup(self) -> None:
        """Load the generator's weights."""
        self.backend.load()

    def _size(self, width: int | None, height: int | None, aspect: float | None = None) -> tuple[int, int]:
        default_w, default_h = self.backend.default_size()
        if width is None and height is None and aspect is not None:
            width = default_w  # keep the reference's aspect ratio at the model's width
            height = round(default_w / aspect)
        width, height = width or default_w, height or default_h
        m = self.backend.size_multiple
        return max(m, min(MAX_SIDE, width) // m * m), max(m, min(MAX_SIDE, height) // m * m)

    def forward(
        self,
        prompt: str | None = None,
        image: Image.Image | None = None,
        changes: dict[str, Any] | None = None,
        objects: list[str] | None = None,
        boxes: list[list[float]] | None = None,
        phrases: list[str] | None = None,
        seed: int | None = None,
        steps: int | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> ToolOutput:
        """Pick the mode from the arguments and render."""
        seed = 0 if seed is None else seed
        steps = steps or self.steps or self.backend.default_steps()
        if prompt is not None and not prompt.strip() and image is None and not boxes:
            raise ToolInputError("the prompt is empty; describe the image to generate")
        info: dict[str, Any] = {"seed": seed, "steps": steps, "backend": self.backend_name}
        if image is not None:
            result, info2, text = self._similar(
                image, prompt, changes or {}, objects or [], seed, steps, width, height
            )
        elif boxes or phrases:
            result, info2, text = self._layout(prompt, boxes or [], phrases or [], seed, steps, width, height)
        elif prompt:
            w, h = self._size(width, height)
            result = self.backend.text(prompt, seed, steps, w, h)
            info2, text = {"mode": "text", "prompt": prompt}, f"from the prompt '{prompt}'"
        else:
            raise ToolInputError(
                "nothing to generate: give 'prompt', or 'boxes' with 'phrases', or a reference 'image' with 'changes'"
            )
        info.update(info2)
        info["size"] = [result.width, result.height]
        content = f"generated a {result.width}x{result.height} image {text} (seed {seed}, {steps} steps)"
        return ToolOutput(content=content, images=[result], artifact=info)

    def _layout(
        self,
        prompt: str | None,
        boxes: list,
        phrases: list[str],
        seed: int,
        steps: int,
        width: Any,
        height: Any,
    ) -> tuple[Image.Image, dict[str, Any], str]:
        if len(boxes) != len(phrases):
            raise ToolInputError(
                f"got {len(boxes)} boxes but {len(phrases)} phrases; give one phrase per box"
            )
        if any(not p.strip() for p in phrases):
            raise ToolInputError("a layout phrase is empty; name the object in each box, e.g. 'person'")
        w, h = self._size(width, height)
        checked = [imaging.check_box(b, w, h)[0] for b in boxes]
        labels = [self.backend.canonical(p) for p in phrases]
        layout = Layout(w, h, checked, labels)
        image = self.backend.layout(prompt, layout, seed, steps)
        planned = layout.counts()
        counted, how = self.recount(image, planned)
        info = {
            "mode": "layout",
            "prompt": prompt,
            "layout": layout.to_dict(),
            "layout_used": self.backend.supports_layout,
            "counts_planned": planned,
            "counts_counted": counted,
        }
        return image, info, f"from a layout of {len(boxes)} box(es); {how}"

    def _similar(
        self,
        reference: Image.Image,
        prompt: str | None,
        changes: dict[str, Any],
        objects: list[str],
        seed: int,
        steps: int,
        width: Any,
        height: Any,
    ) -> tuple[Image.Image, dict[str, Any], str]:
        if self.grounding is None:
            raise MissingWeightsError(
                "generator: a similar image needs the grounding tool to find the reference's objects; "
                "configure tools.grounding in the profile (build_tools links it to the generator)"
            )
        if any(not str(k).strip() for k in changes):
            raise ToolInputError('a change names no object; use e.g. {"person": 2}')
        named = list(dict.fromkeys([*changes, *objects]))
        if not named:
            raise ToolInputError('say what to change, e.g. changes={"person": 2}, or which objects to keep')
        # without `objects`, the rest of the reference is kept: all the backend can draw, where it can say
        known = [] if objects else self.backend.known_labels()
        covered = {self.backend.canonical(p) for p in named} if known else set()
        phrases = [*named, *(label for label in known if label not in covered)]
        found = self.grounding(image=reference, phrase="; ".join(phrases))
        if found.error:
            raise ToolInputError(found.content)
        before = Layout(reference.width, reference.height, found.artifact["boxes"], found.artifact["labels"])
        edited, notes = edit_layout(before, changes, seed)
        w, h = self._size(width, height, reference.width / reference.height)
        canvas = edited.scaled(w, h)
        canvas.labels = [self.backend.canonical(label) for label in canvas.labels]
        image = self.backend.layout(prompt, canvas, seed, steps)
        counts_before, counts_after = before.counts(), edited.counts()
        phrases = [p for p in phrases if p in named or counts_before.get(p)]  # what was asked or found
        planned = {k: counts_after.get(k, 0) for k in phrases}
        counted, how = self.recount(image, planned)
        summary = ", ".join(f"{k} {counts_before.get(k, 0)} -> {counts_after.get(k, 0)}" for k in phrases)
        info = {
            "mode": "similar",
            "prompt": prompt,
            "changes": changes,
            "counts_before": {k: counts_before.get(k, 0) for k in phrases},
            "counts_planned": planned,
            "counts_counted": counted,
            "layout": canvas.to_dict(),
            "layout_used": self.backend.supports_layout,
            "notes": notes,
        }
        text = f"similar to the reference, planned {summary}; {how}" + (
            "; " + "; ".join(notes) if notes else ""
        )
        return image, info, text

    def recount(self, image: Image.Image, planned: dict[str, int]) -> tuple[dict[str, int] | None, str]:
        """Count the planned objects in the generated image with the counter: (counts or None, a short text)."""
        if not planned:
            return {}, "nothing to count"
        if self.counter is None:
            return None, "counts are planned, not counted (no counter tool to check the image)"
        found = self.counter(image=image, phrase="; ".join(planned))
        if found.error:
            return None, f"counts are planned, not counted (the counter failed: {found.content})"
        per_label = found.artifact.get("per_label", {})
        counted = {k: int(per_label.get(k, 0)) for k in planned}
        text = ", ".join(f"{n} {k}" for k, n in counted.items())
        off = [k for k in planned if counted[k] != planned[k]]
        return counted, f"counted in the new image: {text}" + (
            f" (differs from the plan for {', '.join(off)})" if off else " (as planned)"
        )
