"""Images and boxes: loading and normalising images, downscaling with the scale kept, box checks, NMS,
tiling and drawing.

`load_image` is the one image loader of toolvlm (tools, the VLM, the agent and sessions use it): EXIF
orientation applied, every mode made RGB with transparency composited on white, and missing, empty,
truncated, corrupt or huge files refused with an `ImageLoadError` naming the file, before any decoding for
images above `MAX_PIXELS`.

Boxes are `[x0, y0, x1, y1]` floats in pixels of the image as given. Everything here is numpy and PIL:
no torch, no models. Input problems raise `ToolInputError` with a message for the model.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from toolvlm.tools.base import ToolInputError

Box = list[float]
# larger images are refused before they are decoded: 100 MP is 300 MB of RGB, more than any photo needs
MAX_PIXELS = 100_000_000
EXIF_ORIENTATION = 0x0112
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


class ImageLoadError(ToolInputError):
    """An input that should be an image is missing, unreadable, too large or not an image; names the file."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (grayscale, RGBA, palette, CMYK, 16-bit, bilevel) to RGB; transparency goes on
    white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = array.max() if array.size and array.max() > 255 else 255.0
        image = Image.fromarray((np.clip(array / top, 0, 1) * 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if image.mode == "La":  # premultiplied; Pillow converts it to nothing, so read its bands as LA
            image = Image.merge("LA", image.split())
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ImageLoadError(f"cannot convert an image of mode {image.mode!r} to RGB ({err})") from None


def upright(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: its EXIF orientation (phone photos) applied, the tag dropped."""
    try:
        if image.getexif().get(EXIF_ORIENTATION, 1) == 1:
            return image  # upright already (and no copy made)
        turned = ImageOps.exif_transpose(image)
    except (ValueError, TypeError, OSError, SyntaxError):  # unreadable EXIF: keep the pixels as stored
        return image
    return image if turned is None else turned


def load_image(source: str | Path | bytes | Image.Image, max_pixels: int | None = None) -> Image.Image:
    """An upright RGB PIL image from a PIL image, a file path or encoded bytes; raises ImageLoadError naming
    the file when it is missing, a folder, empty, truncated, corrupt, not an image or above `max_pixels`
    (default MAX_PIXELS) pixels."""
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, Image.Image):
        _check_size(source.size, "the image", limit)
        return to_rgb(upright(source))
    if isinstance(source, bytes | bytearray):
        name, opener = "<bytes>", io.BytesIO(bytes(source))
        if not source:
            raise ImageLoadError("image data is empty (0 bytes)")
    elif isinstance(source, str | Path):
        path = Path(source).expanduser()
        name, opener = str(path), path
        _check_file(path)
    else:
        raise ImageLoadError(
            f"expected an image (a handle such as 'img_0', a file path or a PIL image), got {type(source).__name__}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is MAX_PIXELS
            with Image.open(opener) as opened:
                _check_size(opened.size, name, limit)
                opened.load()
                return to_rgb(upright(opened))
    except Image.DecompressionBombError as err:  # Pillow's guard, above twice its MAX_IMAGE_PIXELS
        raise ImageLoadError(f"{name} is too large to open safely ({err}); pass a smaller image") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"not an image (or a format Pillow cannot read): {name}") from None
    except PermissionError:
        raise ImageLoadError(f"cannot read image file {name}: permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # truncated or corrupt data
        if isinstance(err, ImageLoadError):
            raise
        raise ImageLoadError(f"corrupt or truncated image file {name}: {err}") from None


def _check_file(path: Path) -> None:
    """Raise ImageLoadError when `path` is not a readable, non-empty file."""
    hint = "pass an image handle such as 'img_0' or the path of an image file"
    if not path.exists():
        raise ImageLoadError(f"image file not found: {path} ({hint})")
    if path.is_dir():
        raise ImageLoadError(f"expected an image file, got a folder: {path}")
    if not path.is_file():
        raise ImageLoadError(f"not a regular file: {path} ({hint})")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"image file is empty (0 bytes): {path}")


def _check_size(size: tuple[int, int], name: str, limit: int) -> None:
    """Raise ImageLoadError when an image of `size` has no pixels or more than `limit`."""
    width, height = size
    if width < 1 or height < 1:
        raise ImageLoadError(f"{name} has no pixels ({width}x{height})")
    if width * height > limit:
        raise ImageLoadError(
            f"{name} is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels), above the limit of "
            f"{limit / 1e6:.0f} megapixels; pass a smaller image (or raise toolvlm.tools.imaging.MAX_PIXELS)"
        )


def fit_image(image: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    """Downscale so that the longer side is at most `max_side`; returns (image, scale new/old)."""
    longest = max(image.size)
    if longest <= max_side:
        return image, 1.0
    scale = max_side / longest
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR), scale


def scale_boxes(boxes: Sequence[Sequence[float]], factor: float) -> list[Box]:
    """Multiply every coordinate by `factor`."""
    return [[float(c) * factor for c in box] for box in boxes]


def clip_box(box: Sequence[float], width: int, height: int) -> Box:
    """Clip a box to the image."""
    x0, y0, x1, y1 = (float(c) for c in box)
    return [
        min(max(x0, 0.0), width),
        min(max(y0, 0.0), height),
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
    ]


def check_box(box: Sequence[float], width: int, height: int) -> tuple[Box, bool]:
    """Validate a caller's box: returns (box clipped to the image, whether it was clipped); raises on nonsense."""
    if len(box) != 4 or not all(isinstance(c, int | float) and math.isfinite(c) for c in box):
        raise ToolInputError(f"a box is 4 numbers [x0, y0, x1, y1] in pixels, got {list(box)!r}")
    x0, y0, x1, y1 = (float(c) for c in box)
    if x1 <= x0 or y1 <= y0:
        raise ToolInputError(f"box {list(box)} is empty or reversed; it must satisfy x0 < x1 and y0 < y1")
    clipped = clip_box(box, width, height)
    if clipped[2] - clipped[0] < 1 or clipped[3] - clipped[1] < 1:
        raise ToolInputError(
            f"box {list(box)} lies outside the image, which is {width}x{height} pixels "
            f"(x in 0..{width}, y in 0..{height})"
        )
    return clipped, clipped != [x0, y0, x1, y1]


def box_area(box: Sequence[float]) -> float:
    """Area of a box (0 when empty)."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes."""
    inter = box_area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def nms(
    boxes: Sequence[Sequence[float]],
    scores: Sequence[float],
    iou_threshold: float,
    contain_threshold: float = 1.0,
    groups: Sequence[int] | None = None,
    cross_iou: float | None = None,
) -> list[int]:
    """Greedy non-maximum suppression; indices kept, best score first. With `contain_threshold` < 1, a box is
    also suppressed when that share of the smaller of it and a better box lies in both (a part inside a whole).
    With `groups` (e.g. the view each box was seen in), a better box of another group suppresses above
    `cross_iou` instead of `iou_threshold`."""
    if len(boxes) == 0:
        return []
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    order = list(np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable"))
    areas = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    group = np.zeros(len(b), dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    cross = iou_threshold if cross_iou is None else cross_iou
    keep: list[int] = []
    while order:
        i = order.pop(0)
        keep.append(int(i))
        if not order:
            break
        rest = np.asarray(order)
        w = np.clip(np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0]), 0, None)
        h = np.clip(np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1]), 0, None)
        inter = w * h
        union = areas[i] + areas[rest] - inter
        overlap = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
        smaller = np.minimum(areas[i], areas[rest])
        inside = np.where(smaller > 0, inter / np.maximum(smaller, 1e-12), 0.0)
        limit = np.where(group[rest] == group[i], iou_threshold, cross)
        order = [
            int(j)
            for j, o, c, t in zip(rest, overlap, inside, limit, strict=True)
            if o <= t and (c < contain_threshold or contain_threshold >= 1.0)
        ]
    return keep


def tiles(width: int, height: int, tile: int, overlap: float = 0.2) -> list[tuple[int, int, int, int]]:
    """Overlapping windows `(x0, y0, x1, y1)` of side at most `tile` covering the whole image."""

    def starts(length: int) -> list[int]:
        if length <= tile:
            return [0]
        step = max(1, int(tile * (1 - overlap)))
        n = math.ceil((length - tile) / step) + 1
        return [round(i * (length - tile) / (n - 1)) for i in range(n)]

    return [
        (x, y, min(x + tile, width), min(y + tile, height)) for y in starts(height) for x in starts(width)
    ]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def draw_boxes(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[str] | None = None,
    scores: Sequence[float] | None = None,
) -> Image.Image:
    """A copy of `image` with the boxes drawn, each labelled (and scored when scores are given)."""
    canvas = to_rgb(image).copy()
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(max(canvas.size) / 300))
    font = _font(max(10, round(max(canvas.size) / 50)))
    names = sorted(set(labels or []))
    for i, box in enumerate(boxes):
        label = labels[i] if labels else ""
        color = PALETTE[names.index(label) % len(PALETTE)] if label in names else PALETTE[0]
        x0, y0, x1, y1 = clip_box(box, canvas.width - 1, canvas.height - 1)
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=color, width=width)
        text = label + (f" {scores[i]:.2f}" if scores is not None else "")
        if text.strip():
            left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
            ty = y0 - (bottom - top) - 2 if y0 - (bottom - top) - 2 >= 0 else y0
            draw.rectangle([x0, ty, x0 + right - left + 2, ty + bottom - top + 2], fill=color)
            draw.text((x0 + 1, ty), text, fill=(255, 255, 255), font=font)
    return canvas


def round_box(box: Sequence[float], digits: int = 1) -> Box:
    """Round coordinates for artifacts."""
    return [round(float(c), digits) for c in box]
