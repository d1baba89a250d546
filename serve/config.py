"""Settings of `toolvlm serve`: where it listens, what it loads, and the limits it enforces.

A typed dataclass with the defaults documented next to each field; `from_dict` refuses unknown keys, naming the
known ones. This module knows numbers and names, not HTTP or models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class ServeConfig:
    """Where the server listens, which assistant it serves, and its limits."""

    host: str = "127.0.0.1"  # loopback by default: nothing outside this machine can reach it
    port: int = 8000
    profile: str | None = None  # a profile path or name; None: the default bundle
    controller: str = "profile"  # "profile": the profile's controller; "workflow": the fast rule-based one
    sessions: str = "toolvlm_sessions"  # one folder per conversation under this one
    workers: int = 1  # turns run at once (the models are shared; generation is CPU-bound)
    queue: int = 16  # turns waiting for a worker before new ones get 429
    max_body_bytes: int = 20 * 1024 * 1024  # a whole request body
    max_image_bytes: int = 8 * 1024 * 1024  # one image file, encoded
    max_image_pixels: int = 4096 * 4096  # one image, width x height
    max_images: int = 8  # images in one request
    max_question_chars: int = 4000  # the question of one turn
    turn_timeout_s: float = 300.0  # a turn still running after this is cancelled (its steps are kept)
    cached_sessions: int = 64  # assistants kept in memory; others are re-read from their folders

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ServeConfig:
        """Build from a mapping; unknown keys raise, naming the known ones."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown serve option(s) {unknown}; options are: {', '.join(sorted(known))}")
        config = cls(**data)
        config.check()
        return config

    def check(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if self.controller not in ("profile", "workflow"):
            raise ValueError(f"controller must be 'profile' or 'workflow', got {self.controller!r}")
        for name in ("workers", "max_body_bytes", "max_image_bytes", "max_image_pixels", "max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.queue < 0 or self.max_question_chars < 1 or self.turn_timeout_s <= 0:
            raise ValueError(
                f"queue >= 0, max_question_chars >= 1 and turn_timeout_s > 0 are needed; got {self.queue}, "
                f"{self.max_question_chars}, {self.turn_timeout_s}"
            )

    def limits(self) -> dict[str, Any]:
        """The limits a client may want to know (served at /api/limits)."""
        names = ("max_body_bytes", "max_image_bytes", "max_image_pixels", "max_images", "max_question_chars")
        return {
            **{n: getattr(self, n) for n in names},
            "turn_timeout_s": self.turn_timeout_s,
            "workers": self.workers,
            "queue": self.queue,
        }

    def to_dict(self) -> dict[str, Any]:
        """The settings as a dict."""
        return asdict(self)
