"""What a request brings, checked against the limits: images (bytes, data URLs), questions, session ids.

Every refusal is a `ServeError` carrying the HTTP status, a short kind ("image_too_large", ...) and a message
that names the limit and the value seen; the app turns it into a JSON error. This module knows bytes and
limits, not HTTP frameworks or models.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image

from .config import ServeConfig

SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HANDLE = re.compile(r"^img_\d{1,6}$")
DATA_URL = re.compile(r"^data:(image/[A-Za-z0-9.+-]+)?(;[^,]*)?,", re.S)


class ServeError(Exception):
    """A request the server refuses: HTTP status, a short kind, and a message for the user."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.headers = headers or {}

    def to_json(self) -> dict[str, object]:
        """The error body (OpenAI's shape: {"error": {"message", "type", "code"}})."""
        return {"error": {"message": self.message, "type": self.kind, "code": self.status}}


def check_question(text: str, config: ServeConfig) -> str:
    """The question, or a 400/413 naming what is wrong with it."""
    if not isinstance(text, str) or not text.strip():
        raise ServeError(400, "empty_question", "the question is empty; write what you want to know")
    if len(text) > config.max_question_chars:
        raise ServeError(
            413,
            "question_too_long",
            f"the question has {len(text)} characters; the limit is {config.max_question_chars}",
        )
    return text


def check_session_id(session_id: str) -> str:
    """A session id safe to use as a folder name, or a 400."""
    if not SESSION_ID.match(session_id or ""):
        raise ServeError(
            400, "bad_session_id", f"session id {session_id!r} is not valid (letters, digits, '_', '-', '.')"
        )
    return session_id


def check_image_count(n: int, config: ServeConfig) -> None:
    """A 413 when a request brings more images than allowed."""
    if n > config.max_images:
        raise ServeError(
            413, "too_many_images", f"{n} images in one request; the limit is {config.max_images}"
        )


def decode_image(data: bytes, config: ServeConfig, name: str = "image") -> Image.Image:
    """An RGB image from encoded bytes, refusing files over the byte or pixel limits or not images."""
    if len(data) > config.max_image_bytes:
        raise ServeError(
            413,
            "image_too_large",
            f"{name} is {len(data)} bytes; the limit is {config.max_image_bytes} bytes",
        )
    if not data:
        raise ServeError(400, "bad_image", f"{name} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size  # read from the header, before any pixel is decoded
                if width * height > config.max_image_pixels:
                    raise ServeError(
                        413,
                        "image_too_large",
                        f"{name} is {width}x{height} = {width * height} pixels; "
                        f"the limit is {config.max_image_pixels} pixels",
                    )
                return im.convert("RGB")
    except ServeError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ServeError(400, "bad_image", f"{name} is not an image the server can read: {err}") from None


def decode_data_url(url: str, config: ServeConfig, name: str = "image") -> Image.Image:
    """An image from a `data:image/...;base64,...` URL, with the same limits as an upload."""
    match = DATA_URL.match(url)
    if not match or ";base64" not in (match.group(2) or ""):
        raise ServeError(400, "bad_image", f"{name}: expected a base64 data URL (data:image/png;base64,...)")
    payload = url[match.end() :]
    if len(payload) > config.max_image_bytes * 4 // 3 + 4:
        raise ServeError(
            413,
            "image_too_large",
            f"{name} is about {len(payload) * 3 // 4} bytes; the limit is {config.max_image_bytes} bytes",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ServeError(400, "bad_image", f"{name}: the data URL is not valid base64: {err}") from None
    return decode_image(data, config, name)
