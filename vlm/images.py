"""Images as the VLM receives them: loaded by toolvlm's one image loader, and a content key for caching.

It knows nothing of models. Loading (paths, bytes or PIL images -> upright RGB, with `ImageLoadError` naming a
missing, empty, corrupt or huge file) is `toolvlm.tools.imaging.load_image`, re-exported here; this module adds
`image_key`, a hash of an image's pixels, so that the same picture is encoded once per session, whatever object
carries it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image

from toolvlm.tools.imaging import ImageLoadError, load_image, to_rgb

ImageLike = Image.Image | str | Path | bytes

__all__ = ["ImageLike", "ImageLoadError", "image_key", "load_image", "to_rgb"]


def image_key(image: Image.Image) -> str:
    """A content hash of an image's pixels and size: equal pictures share a key."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
