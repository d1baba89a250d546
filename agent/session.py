"""Session folders: the trajectory as JSON lines plus one PNG per image, written after every step.

Layout of a session folder:

    session.json          {"format": 1, "created": ..., "profile": ...}
    archive/N/            earlier conversations of the folder (after a reset), in the same layout
    trajectory.jsonl      one step per line (trajectory.step_to_dict)
    images/img_0.png      every image of the session, by handle
    images/sources.json   {"img_0": "user", "img_1": "grounding", ...}

An image file is written (to a temporary name, then renamed) before the step that names it, and every line is
flushed to disk before the next step starts, so a crash or Ctrl-C loses nothing already done; a line torn by a
crash mid-write is dropped on load with a warning. This module knows files, not models or tools.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from PIL import Image

from .memory import ImageMemory
from .trajectory import Step, Trajectory, step_from_dict, step_to_dict

logger = logging.getLogger(__name__)

FORMAT = 1
STEPS_FILE = "trajectory.jsonl"
META_FILE = "session.json"
IMAGES_DIR = "images"
SOURCES_FILE = "sources.json"


class SessionStore:
    """Reads and appends to one session folder."""

    def __init__(self, folder: str | Path, meta: dict[str, Any] | None = None, create: bool = True):
        self.folder = Path(folder).expanduser()
        self.images_dir = self.folder / IMAGES_DIR
        if not create:  # read-only use: the folder must be a session already
            if not self.steps_path.is_file():
                raise FileNotFoundError(f"{self.folder} is not a toolvlm session folder (no {STEPS_FILE})")
            self._sources = self._read_sources()
            return
        self.images_dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.folder / META_FILE
        if not meta_path.is_file():
            _write_json(
                meta_path, {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(meta or {})}
            )
        self._sources: dict[str, str] = self._read_sources()

    @property
    def steps_path(self) -> Path:
        return self.folder / STEPS_FILE

    def image_path(self, handle: str) -> Path:
        """Where the image of `handle` is (or will be) stored."""
        return self.images_dir / f"{handle}.png"

    def save_image(self, handle: str, image: Image.Image, source: str) -> Path:
        """Write one image under its handle (atomically) and record who brought it."""
        path = self.image_path(handle)
        tmp = path.with_suffix(".tmp.png")
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
        self._sources[handle] = source
        _write_json(self.images_dir / SOURCES_FILE, self._sources)
        return path

    def append(self, step: Step) -> None:
        """Append one step as a JSON line and flush it to disk."""
        line = json.dumps(step_to_dict(step), ensure_ascii=False, default=_json_default)
        with self.steps_path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, trajectory: Trajectory) -> None:
        """Replace the stored steps with `trajectory` (atomically)."""
        tmp = self.steps_path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for step in trajectory:
                f.write(json.dumps(step_to_dict(step), ensure_ascii=False, default=_json_default) + "\n")
        os.replace(tmp, self.steps_path)

    def load(self) -> tuple[Trajectory, ImageMemory]:
        """The stored trajectory and its images (empty for a new folder)."""
        trajectory = Trajectory()
        if self.steps_path.is_file():
            lines = self.steps_path.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError:
                    if number == len(lines):  # torn by a crash mid-write
                        logger.warning("%s: dropped an incomplete last line", self.steps_path)
                        continue
                    raise ValueError(f"{self.steps_path}:{number}: not a JSON line") from None
                trajectory.append(step_from_dict(data))
        memory = ImageMemory()
        for handle in trajectory.image_handles():
            path = self.image_path(handle)
            if not path.is_file():
                raise FileNotFoundError(f"session {self.folder}: image {handle} is missing ({path})")
            if handle != f"img_{len(memory)}":
                raise ValueError(
                    f"session {self.folder}: images out of order: {handle} after {memory.handles}"
                )
            with Image.open(path) as im:
                memory.add(im.convert("RGB"), self._sources.get(handle, "user"))
        return trajectory, memory

    def archive(self) -> Path | None:
        """Move the stored conversation to `archive/N/` and start an empty one; returns where it went."""
        if not self.steps_path.is_file() and not any(self.images_dir.iterdir()):
            return None
        archive_root = self.folder / "archive"
        n = 0
        while (archive_root / str(n)).exists():
            n += 1
        target = archive_root / str(n)
        target.mkdir(parents=True)
        if self.steps_path.is_file():
            os.replace(self.steps_path, target / STEPS_FILE)
        os.replace(self.images_dir, target / IMAGES_DIR)
        self.images_dir.mkdir()
        self._sources = {}
        return target

    def meta(self) -> dict[str, Any]:
        """The session's metadata."""
        return json.loads((self.folder / META_FILE).read_text())

    def _read_sources(self) -> dict[str, str]:
        path = self.images_dir / SOURCES_FILE
        return json.loads(path.read_text()) if path.is_file() else {}


def load_session(folder: str | Path) -> tuple[Trajectory, ImageMemory]:
    """Read a session folder (trajectory and images) without writing to it."""
    return SessionStore(folder, create=False).load()


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    """JSON for the odd values tool artifacts carry (numpy scalars and arrays, tuples, paths)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Image.Image):
        return f"<image {value.width}x{value.height}>"
    return str(value)


def jsonable(data: Any) -> Any:
    """`data` made JSON-serialisable the way a session stores it."""
    return json.loads(json.dumps(data, default=_json_default))


def new_session_dir(root: str | Path = "toolvlm_sessions") -> Path:
    """A fresh folder under `root` named by the current time."""
    root = Path(root).expanduser()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = root / stamp, 1
    while folder.exists():
        n += 1
        folder = root / f"{stamp}-{n}"
    return folder
