"""Image memory: every image of a session under a stable handle, `img_0`, `img_1`, ... in order of arrival.

User-given and tool-made images share one numbering, so the model and the user can name any of them in a later
turn ("count the people in img_2"). A handle, once given, always means the same image. This module keeps the
images and where they came from; it knows nothing about files (see session.py) or messages (trajectory.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image

# exactly "img_" and a number written without leading zeros: "img_00", "img_0\n" and " img_0" name no image
HANDLE_RE = re.compile(r"img_(0|[1-9][0-9]*)")


@dataclass
class ImageRecord:
    """One remembered image: its handle, the image, and who brought it ("user" or a tool's name)."""

    handle: str
    image: Image.Image
    source: str


class UnknownImageError(KeyError):
    """A handle that names no image of the session; its text lists the handles there are."""

    def __str__(self) -> str:  # KeyError quotes its argument; this one is a sentence
        return str(self.args[0]) if self.args else ""


class ImageMemory:
    """The images of a session, addressed by handle."""

    def __init__(self) -> None:
        self._records: list[ImageRecord] = []

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, handle: object) -> bool:
        return isinstance(handle, str) and self._index(handle) is not None

    def add(self, image: Image.Image, source: str = "user") -> str:
        """Remember `image` and return its new handle."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"ImageMemory.add takes a PIL image, got {type(image).__name__}")
        handle = f"img_{len(self._records)}"
        self._records.append(ImageRecord(handle, image, source))
        return handle

    def get(self, handle: str) -> Image.Image:
        """The image of `handle`; raises UnknownImageError naming the known handles."""
        return self.record(handle).image

    def record(self, handle: str) -> ImageRecord:
        """The record of `handle`; raises UnknownImageError naming the known handles."""
        index = self._index(handle)
        if index is None:
            raise UnknownImageError(f"unknown image {handle!r}; {self.describe_handles()}")
        return self._records[index]

    def _index(self, handle: str) -> int | None:
        match = HANDLE_RE.fullmatch(handle)
        if match is None:
            return None
        index = int(match.group(1))
        return index if index < len(self._records) else None

    @property
    def handles(self) -> list[str]:
        """All handles, in order of arrival."""
        return [r.handle for r in self._records]

    @property
    def records(self) -> list[ImageRecord]:
        """All records, in order of arrival."""
        return list(self._records)

    def describe_handles(self) -> str:
        """A sentence listing the images there are, for messages to the model or the user."""
        if not self._records:
            return "there are no images in this conversation yet"
        return "images are: " + ", ".join(f"{r.handle} (from {r.source})" for r in self._records)

    def truncate(self, length: int) -> None:
        """Forget the images after the first `length` (the step that would have named them was not saved)."""
        del self._records[length:]

    def clear(self) -> None:
        """Forget every image (a new conversation)."""
        self._records.clear()
