"""The models a server loads once, and the conversations (session folders) it serves with them.

`SharedModels` builds the controller and tools of a profile once per process; every session's `Assistant` uses
the same objects. Controllers and tools that are not declared `thread_safe` are wrapped so that one thread at a
time computes with them (a local VLM keeps a KV cache that two generations at once would corrupt).
`SessionManager` maps session ids to folders under one root, keeps recently used assistants in memory, and holds
one lock per session: only the turn holding it may write the folder. It knows assistants and folders, not HTTP.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolvlm.agent.assistant import Assistant
from toolvlm.agent.loop import AgentConfig
from toolvlm.agent.session import META_FILE, STEPS_FILE, SessionStore
from toolvlm.agent.trajectory import AssistantStep, EndStep, Step, ToolStep, UserStep

from .config import ServeConfig
from .inputs import HANDLE, ServeError, check_session_id

logger = logging.getLogger(__name__)


class LockedController:
    """A shared controller used by one thread at a time (for the whole of each generation)."""

    def __init__(self, inner: Any, lock: threading.Lock):
        self._inner = inner
        self._lock = lock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def stream(self, messages: Any, images: Any = None, **options: Any) -> Iterator[str]:
        """The inner controller's stream, holding the compute lock until it ends or is closed."""
        with self._lock:
            yield from self._inner.stream(messages, images, **options)

    def generate(self, messages: Any, images: Any = None, **options: Any) -> str:
        """The inner controller's whole reply, under the compute lock."""
        with self._lock:
            return self._inner.generate(messages, images, **options)

    def reset(self) -> None:
        """Forget the inner controller's caches, under the compute lock."""
        reset = getattr(self._inner, "reset", None)
        if reset is not None:
            with self._lock:
                reset()


class LockedTool:
    """A shared tool called by one thread at a time (its lazy setup included)."""

    def __init__(self, inner: Any, lock: threading.Lock):
        self._inner = inner
        self._lock = lock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, **kwargs: Any) -> Any:
        with self._lock:
            return self._inner(**kwargs)


@dataclass
class SharedModels:
    """A controller, tools and agent options built once and shared by every session."""

    controller: Any
    tools: dict[str, Any]
    agent_options: dict[str, Any] = field(default_factory=dict)
    name: str = "toolvlm"
    source: str = ""

    @classmethod
    def load(cls, config: ServeConfig) -> SharedModels:
        """Build the profile's tools, and its controller or the workflow controller (`config.controller`)."""
        from toolvlm.agent.profiles import build_controller, default_profile, load_profile
        from toolvlm.tools.registry import build_tools

        profile = default_profile() if config.profile is None else load_profile(config.profile)
        start = time.perf_counter()
        tools = build_tools(profile.tools)
        options = dict(profile.agent)
        if config.controller == "workflow":
            from .workflow import WorkflowController

            controller: Any = WorkflowController()
            options["constrained"] = False  # it writes its calls itself; there is no tokenizer to constrain
        else:
            controller = build_controller(profile.controller)
        logger.info("loaded %s in %.1f s", profile.source, time.perf_counter() - start)
        return cls.wrap(controller, tools, options, source=profile.source)

    @classmethod
    def wrap(
        cls,
        controller: Any,
        tools: Mapping[str, Any] | Sequence[Any],
        agent_options: Mapping[str, Any] | None = None,
        *,
        name: str = "toolvlm",
        source: str = "",
    ) -> SharedModels:
        """Share `controller` and `tools`: those not marked `thread_safe` get one compute lock between them."""
        tools = dict(tools) if isinstance(tools, Mapping) else {t.name: t for t in tools}
        lock = threading.Lock()
        if not getattr(controller, "thread_safe", False):
            controller = LockedController(controller, lock)
        shared_tools = {
            k: t if getattr(t, "thread_safe", False) else LockedTool(t, lock) for k, t in tools.items()
        }
        options = dict(agent_options or {})
        AgentConfig.from_dict(options)  # unknown options fail now, not at the first turn
        return cls(controller, shared_tools, options, name, source)


class SessionManager:
    """Session folders under one root: create, list, load (cached), and one writer lock each."""

    def __init__(self, models: SharedModels, root: str | Path, cached: int = 64):
        self.models = models
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.cached = cached
        self._assistants: OrderedDict[str, Assistant] = OrderedDict()
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def folder(self, session_id: str) -> Path:
        """The folder of a session id (checked to be a plain name under the root)."""
        return self.root / check_session_id(session_id)

    def exists(self, session_id: str) -> bool:
        """True when the session's folder is a session."""
        return (self.folder(session_id) / META_FILE).is_file()

    def create(self) -> str:
        """A new, empty session; returns its id (time-stamped, with a random suffix)."""
        while True:
            session_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
            folder = self.folder(session_id)
            try:
                folder.mkdir(parents=True)
                break
            except FileExistsError:
                continue
        SessionStore(folder, meta={"profile": self.models.source, "server": "toolvlm serve"})
        return session_id

    def lock(self, session_id: str) -> threading.Lock:
        """The writer lock of a session."""
        with self._guard:
            return self._locks.setdefault(session_id, threading.Lock())

    def acquire(self, session_id: str) -> threading.Lock:
        """Take a session's writer lock now, or answer 409 (another turn is writing it) / 404 (no session)."""
        if not self.exists(session_id):
            raise ServeError(404, "session_not_found", f"no session {session_id!r}; create one first")
        lock = self.lock(session_id)
        if not lock.acquire(blocking=False):
            raise ServeError(
                409, "session_busy", f"session {session_id!r} is answering another turn; wait for it to end"
            )
        return lock

    def assistant(self, session_id: str) -> Assistant:
        """The session's Assistant (call with its lock held): from memory, or read back from its folder."""
        with self._guard:
            bot = self._assistants.get(session_id)
            if bot is not None:
                self._assistants.move_to_end(session_id)
                return bot
        store = SessionStore(self.folder(session_id))
        bot = Assistant(
            self.models.controller, self.models.tools, config=self.models.agent_options, session=store
        )
        with self._guard:
            self._assistants[session_id] = bot
            while len(self._assistants) > self.cached:
                self._assistants.popitem(last=False)
        return bot

    def forget(self, session_id: str) -> None:
        """Drop a session's cached Assistant (it is read back from its folder next time)."""
        with self._guard:
            self._assistants.pop(session_id, None)

    def discard(self, session_id: str) -> None:
        """Delete a session folder this server just made and never ran a turn in."""
        self.forget(session_id)
        shutil.rmtree(self.folder(session_id), ignore_errors=True)

    def image_path(self, session_id: str, handle: str) -> Path:
        """The PNG of an image handle of a session, or a 404."""
        if not HANDLE.match(handle):
            raise ServeError(400, "bad_handle", f"{handle!r} is not an image handle (img_0, img_1, ...)")
        path = self.folder(session_id) / "images" / f"{handle}.png"
        if not path.is_file():
            raise ServeError(404, "image_not_found", f"session {session_id!r} has no image {handle}")
        return path

    def list(self, limit: int = 200) -> list[dict[str, Any]]:
        """The newest sessions first: id, created, title (the first question), turns, images, busy."""
        out = []
        folders = sorted((p for p in self.root.iterdir() if (p / META_FILE).is_file()), reverse=True)
        for folder in folders[:limit]:
            steps = read_steps(folder)
            users = [s for s in steps if isinstance(s, UserStep)]
            meta = json.loads((folder / META_FILE).read_text())
            out.append(
                {
                    "id": folder.name,
                    "created": meta.get("created"),
                    "title": (users[0].text[:80] if users else ""),
                    "turns": len(users),
                    "images": len(list((folder / "images").glob("img_*.png"))),
                    "busy": self.lock(folder.name).locked(),
                }
            )
        return out

    def history(self, session_id: str) -> list[dict[str, Any]]:
        """The session's turns for a page to redraw: question, user images, tool steps, answer."""
        if not self.exists(session_id):
            raise ServeError(404, "session_not_found", f"no session {session_id!r}")
        from .wire import step_json

        turns: list[dict[str, Any]] = []
        for step in read_steps(self.folder(session_id)):
            if isinstance(step, UserStep):
                turns.append({"question": step.text, "images": step.images, "steps": [], "answer": None})
            elif not turns:
                continue
            elif isinstance(step, ToolStep):
                turns[-1]["steps"].append(step_json(step, session_id))
            elif isinstance(step, AssistantStep) and step.is_answer:
                turns[-1]["answer"] = {
                    "text": step.text,
                    "finish": "cancelled" if step.cancelled else "answer",
                }
            elif isinstance(step, EndStep):
                turns[-1]["answer"] = {"text": step.text, "finish": step.finish}
        return turns


def read_steps(folder: Path) -> list[Step]:
    """The steps of a session folder, read without taking its lock (a torn last line is skipped)."""
    from toolvlm.agent.trajectory import step_from_dict

    path = folder / STEPS_FILE
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                steps.append(step_from_dict(json.loads(line)))
            except json.JSONDecodeError:
                continue  # a line being written right now
    return steps


def record(bot: Assistant, step: Step) -> None:
    """Append a step to a session's trajectory and folder (call with the session's lock held)."""
    bot.agent.trajectory.append(step)
    if bot.agent.session is not None:
        bot.agent.session.append(step)


def close_turn(bot: Assistant, finish: str, text: str) -> None:
    """End a turn a failure or cancellation left open, so the session stays resumable as a whole."""
    if not bot.agent.trajectory.turn_finished():
        record(bot, EndStep(finish=finish, text=text))
