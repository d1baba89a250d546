"""Session folders: the trajectory as JSON lines plus one PNG per image, written after every step.

Layout of a session folder:

    session.json          {"format": 1, "created": ..., "profile": ...}
    session.lock          held (flock) by the one process writing the folder
    archive/N/            earlier conversations of the folder (after a reset), in the same layout
    trajectory.jsonl      one step per line (trajectory.step_to_dict)
    images/img_0.png      every image of the session, by handle
    images/sources.json   {"img_0": "user", "img_1": "grounding", ...}

An image file is written (to a temporary name, then renamed) before the step that names it, and every line is
written, flushed and fsynced before the next step starts, so a crash or Ctrl-C loses nothing already done. A
line torn by a crash mid-write is dropped on load with a warning, and cut off before the next line is appended,
so a torn folder resumes any number of times. A failed write (a full disk) is undone and raises
`SessionWriteError`; a folder that cannot be read raises `SessionError` naming the file and what to do. One
process at a time writes a folder (`SessionLockedError` for a second one). This module knows files, not models
or tools.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from PIL import Image

from .memory import ImageMemory
from .trajectory import Step, ToolStep, Trajectory, UserStep, step_from_dict, step_to_dict

try:  # POSIX; elsewhere sessions are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

FORMAT = 1
STEPS_FILE = "trajectory.jsonl"
META_FILE = "session.json"
LOCK_FILE = "session.lock"
IMAGES_DIR = "images"
SOURCES_FILE = "sources.json"


class SessionError(ValueError):
    """A session folder that cannot be used as it is; the text names the file and what to do."""


class SessionLockedError(SessionError):
    """Another process is writing the session folder."""


class SessionWriteError(OSError):
    """A step or an image could not be written (a full disk, a folder gone); nothing was left half-written."""

    def __str__(self) -> str:  # the sentence, without OSError's "[Errno N]" prefix
        return self.strerror or super().__str__()


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
        check_session_folder(self.folder)
        try:
            self.images_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SessionWriteError(
                err.errno, f"cannot create the session folder {self.folder}: {_why(err)}"
            ) from err
        _lock_folder(self, self.folder)
        meta_path = self.folder / META_FILE
        if not meta_path.is_file():
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            _guarded_write(
                meta_path,
                lambda: _write_json(meta_path, {"format": FORMAT, "created": stamp, **(meta or {})}),
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

        def write() -> None:
            try:
                with tmp.open("wb") as f:
                    image.save(f, format="PNG")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

        _guarded_write(path, write)
        sources = {**self._sources, handle: source}
        _guarded_write(
            self.images_dir / SOURCES_FILE, lambda: _write_json(self.images_dir / SOURCES_FILE, sources)
        )
        self._sources = sources
        return path

    def append(self, step: Step) -> None:
        """Append one step as a JSON line, flushed and fsynced; a torn last line is cut off first, and a failed
        write is undone (SessionWriteError), so the file only ever holds whole lines."""
        data = (json.dumps(step_to_dict(step), ensure_ascii=False, default=_json_default) + "\n").encode()
        fd = _open_for_append(self.steps_path)
        try:
            size = repair_torn_line(fd, self.steps_path)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            except OSError as err:
                try:
                    os.ftruncate(fd, size)  # undo the part written; shrinking needs no space
                except OSError:
                    logger.warning(
                        "%s: could not cut off a partly written line; it is cut on the next write",
                        self.steps_path,
                    )
                raise SessionWriteError(
                    err.errno, f"cannot save the step to {self.steps_path}: {_why(err)}"
                ) from err
        finally:
            os.close(fd)

    def rewrite(self, trajectory: Trajectory) -> None:
        """Replace the stored steps with `trajectory` (atomically)."""
        tmp = self.steps_path.with_suffix(".tmp")

        def write() -> None:
            try:
                with tmp.open("w", encoding="utf-8") as f:
                    for step in trajectory:
                        f.write(
                            json.dumps(step_to_dict(step), ensure_ascii=False, default=_json_default) + "\n"
                        )
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.steps_path)
            finally:
                tmp.unlink(missing_ok=True)

        _guarded_write(self.steps_path, write)

    def load(self) -> tuple[Trajectory, ImageMemory]:
        """The stored trajectory and its images (empty for a new folder); SessionError names what is wrong."""
        trajectory = Trajectory()
        if self.steps_path.is_file():
            raw = self.steps_path.read_bytes()
            lines = raw.split(b"\n")
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                last = number == len(lines)  # no newline after it: a line a crash tore, unless it is whole
                try:
                    data = json.loads(line.decode("utf-8"))
                    if not isinstance(data, dict):
                        raise ValueError("not a JSON object")
                    step = step_from_dict(data)
                except (ValueError, TypeError) as err:
                    if last:
                        logger.warning(
                            "%s: dropped an incomplete last line (torn by a crash)", self.steps_path
                        )
                        continue
                    raise SessionError(
                        f"{self.steps_path}:{number}: not a trajectory step ({_short(err)}); the steps before it "
                        f"are intact: remove or fix that line, or use a new session folder"
                    ) from None
                trajectory.append(step)
        memory = ImageMemory()
        for handle in trajectory.image_handles():
            path = self.image_path(handle)
            if not path.is_file():
                raise SessionError(
                    f"session {self.folder}: image {handle} is missing ({path}); restore the file, or use a "
                    "new session folder"
                )
            if handle != f"img_{len(memory)}":
                raise SessionError(
                    f"session {self.folder}: images out of order in {self.steps_path}: {handle} after "
                    f"{memory.handles or 'none'}"
                )
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
            except (OSError, Image.DecompressionBombError) as err:
                raise SessionError(
                    f"session {self.folder}: image {handle} cannot be read ({path}: {_short(err)}); restore the "
                    "file, or use a new session folder"
                ) from None
            memory.add(image, self._sources.get(handle) or _source_in(trajectory, handle))
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

    def close(self) -> None:
        """Let another process write the folder (also done when the store is garbage-collected)."""
        finalizer = getattr(self, "_unlock", None)
        if finalizer is not None:
            finalizer()

    def _read_sources(self) -> dict[str, str]:
        path = self.images_dir / SOURCES_FILE
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
                raise ValueError("not a mapping of handles to sources")
        except (ValueError, UnicodeDecodeError) as err:
            logger.warning(
                "%s is not valid JSON (%s); where each image came from is read from the trajectory instead",
                path,
                _short(err),
            )
            return {}
        return data


def check_session_folder(folder: str | Path) -> Path:
    """`folder` as a session folder to write, or SessionError/SessionWriteError saying why it cannot be one
    (a file, an unwritable place); cheap, so commands check it before loading any model."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise SessionError(f"{folder} is a file, not a folder; give a folder for the session")
    if folder.is_dir() and (folder / STEPS_FILE).exists() and not (folder / STEPS_FILE).is_file():
        raise SessionError(f"{folder / STEPS_FILE} is not a file; {folder} is not a usable session folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SessionError(f"cannot create {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SessionWriteError(
            errno.EACCES, f"cannot write the session folder {folder}: {existing} is not writable"
        )
    return folder


# -- one writer per folder -----------------------------------------------------------------------------------

_LOCKS: dict[str, tuple[int, int]] = {}  # folder -> (lock file descriptor, stores of this process using it)
_LOCKS_GUARD = threading.Lock()


def _lock_folder(store: SessionStore, folder: Path) -> None:
    """Take the folder's lock for this process (shared by its stores), or raise SessionLockedError."""
    if fcntl is None:  # pragma: no cover - Windows
        return
    key = str(folder.resolve())
    with _LOCKS_GUARD:
        if key in _LOCKS:
            fd, users = _LOCKS[key]
            _LOCKS[key] = (fd, users + 1)
        else:
            path = folder / LOCK_FILE
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise SessionWriteError(err.errno, f"cannot create {path}: {_why(err)}") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise SessionLockedError(
                    f"session folder {folder} is in use by another toolvlm process (pid {holder}); wait for it "
                    "to finish, or use another folder"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            _LOCKS[key] = (fd, 1)
    store._unlock = weakref.finalize(store, _unlock_folder, key)


def _unlock_folder(key: str) -> None:
    with _LOCKS_GUARD:
        if key not in _LOCKS:
            return
        fd, users = _LOCKS[key]
        if users > 1:
            _LOCKS[key] = (fd, users - 1)
            return
        del _LOCKS[key]
    os.close(fd)  # closing the descriptor releases the flock


# -- whole lines only ----------------------------------------------------------------------------------------


def _open_for_append(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as err:
        raise SessionWriteError(err.errno, f"cannot open {path}: {_why(err)}") from err


def repair_torn_line(fd: int, path: Path | str = "trajectory") -> int:
    """Cut a torn last line (no newline after it) off an open JSON-lines file; a last line that is whole JSON
    and only lacks its newline gets it. Returns the file's size afterwards."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    start = size
    while start > 0:  # find the start of the last line, reading backwards in blocks
        block = min(65536, start)
        chunk = os.pread(fd, block, start - block)
        at = chunk.rfind(b"\n")
        if at >= 0:
            start = start - block + at + 1
            break
        start -= block
    tail = os.pread(fd, size - start, start)
    try:
        if isinstance(json.loads(tail.decode("utf-8")), dict):
            _write_all(fd, b"\n")
            return size + 1
    except ValueError:
        pass
    logger.warning("%s: cut off a torn last line (%d bytes) before appending", path, size - start)
    os.ftruncate(fd, start)
    return start


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _guarded_write(path: Path, write: Any) -> None:
    """Run `write`, turning an OSError into SessionWriteError naming `path`."""
    try:
        write()
    except SessionWriteError:
        raise
    except OSError as err:
        raise SessionWriteError(err.errno, f"cannot write {path}: {_why(err)}") from err


def _why(err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        return "the disk is full (free some space; every step before this one is saved)"
    return err.strerror or str(err)


def _short(err: BaseException) -> str:
    text = str(err)
    return text if len(text) <= 200 else text[:200] + "..."


def _source_in(trajectory: Trajectory, handle: str) -> str:
    """Who brought `handle`, read from the trajectory (for a folder whose sources.json is lost)."""
    for step in trajectory:
        if isinstance(step, UserStep) and handle in step.images:
            return "user"
        if isinstance(step, ToolStep) and handle in step.images:
            return step.name
    return "user"


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
