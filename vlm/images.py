"""Images as the VLM receives them: loading with clear errors, normalising mode, and a content key for caching.

It knows nothing of models: it turns paths, bytes or PIL images into RGB PIL images, and names an image by a
hash of its pixels so that the same picture is encoded once per session, whatever object carries it.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

ImageLike = Image.Image | str | Path | bytes


class ImageLoadError(ValueError):
    """An input that should be an image is missing, unreadable or not an image."""


def load_image(image: ImageLike) -> Image.Image:
    """Return `image` (a PIL image, a path or encoded bytes) as an RGB PIL image, or raise ImageLoadError."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, bytes):
        source, opener = "<bytes>", io.BytesIO(image)
    elif isinstance(image, str | Path):
        path = Path(image)
        if not path.exists():
            raise ImageLoadError(f"image file not found: {path}")
        if path.is_dir():
            raise ImageLoadError(f"expected an image file, got a folder: {path}")
        source, opener = str(path), path
    else:
        raise ImageLoadError(f"expected a PIL image, a path or bytes, got {type(image).__name__}")
    try:
        with Image.open(opener) as img:
            img.load()
            return to_rgb(img)
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"not an image (or a format Pillow cannot read): {source}") from err
    except (OSError, SyntaxError) as err:  # truncated or corrupt data
        raise ImageLoadError(f"corrupt image file {source}: {err}") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert grayscale, palette, RGBA (composited on white) and other modes to RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def image_key(image: Image.Image) -> str:
    """A content hash of an image's pixels and size: equal pictures share a key."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
