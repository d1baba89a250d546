"""The `draw_boxes` tool: draw given boxes (and labels) on an image. No model; it only knows imaging."""

from __future__ import annotations

from typing import Any

from PIL import Image

from toolvlm.tools import imaging
from toolvlm.tools.base import Tool, ToolInputError, ToolOutput

BOX_SCHEMA = {
    "type": "array",
    "items": {"type": "number"},
    "minItems": 4,
    "maxItems": 4,
    "description": "[x0, y0, x1, y1] in pixels",
}


class DrawBoxesTool(Tool):
    """Draw boxes with labels on an image."""

    name = "draw_boxes"
    description = (
        "Draw the given boxes [x0, y0, x1, y1] (pixels of the image) with optional labels on an image; "
        "returns the annotated image."
    )
    inputs = {
        "type": "object",
        "properties": {
            "image": {
                "type": "string",
                "format": "image",
                "description": "the image to draw on (e.g. img_0)",
            },
            "boxes": {
                "type": "array",
                "items": BOX_SCHEMA,
                "description": "boxes [x0, y0, x1, y1] in pixels",
            },
            "labels": {
                "type": "array",
                "items": {"type": "string"},
                "description": "one label per box",
            },
        },
        "required": ["image", "boxes"],
    }

    def __init__(self, device: str = "cpu", dtype: str = "float32", **options: Any) -> None:
        if options:
            raise ValueError(f"draw_boxes takes no options, got {sorted(options)}")
        super().__init__(device=device, dtype=dtype)

    def forward(
        self, image: Image.Image, boxes: list[list[float]], labels: list[str] | None = None
    ) -> ToolOutput:
        """Draw the boxes."""
        if labels is not None and len(labels) != len(boxes):
            raise ToolInputError(f"got {len(boxes)} boxes but {len(labels)} labels; give one label per box")
        checked, notes = [], []
        for i, box in enumerate(boxes):
            clipped, was_clipped = imaging.check_box(box, image.width, image.height)
            checked.append(clipped)
            if was_clipped:
                notes.append(f"box {i} clipped to the image")
        annotated = imaging.draw_boxes(image, checked, labels)
        content = f"drew {len(checked)} box(es) on the {image.width}x{image.height} image"
        if notes:
            content += "; " + "; ".join(notes)
        artifact = {
            "boxes": [imaging.round_box(b) for b in checked],
            "labels": list(labels or []),
            "image_size": [image.width, image.height],
        }
        return ToolOutput(content=content, images=[annotated], artifact=artifact)
