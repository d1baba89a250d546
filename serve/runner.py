"""Turns run in a bounded worker pool: a full queue answers 429, each turn has a deadline, one writer per session.

`TurnRunner.start` takes the session's writer lock (409 when another turn holds it) and a slot among
`workers + queue` (429 when none is free), then runs the turn on a worker thread; its events go into a
`TurnHandle` the HTTP layer reads (streamed, or waited for whole). A turn past its deadline, or whose client went
away, is cancelled at its next event through the agent loop's own cancel path (the steps so far are kept and the
turn is closed), so the session folder stays whole. A turn that fails (a tool or the controller raising) is
closed with an "error" end step and reported as a JSON error naming the exception. This module knows threads
and the agent's events, not HTTP.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .config import ServeConfig
from .inputs import ServeError
from .sessions import SessionManager, close_turn
from .wire import event_json, image_refs

logger = logging.getLogger(__name__)

_DONE = object()


class TurnCancelled(KeyboardInterrupt):  # noqa: N818 -- the agent loop's cancel path catches KeyboardInterrupt
    """Thrown into a running turn to stop it (deadline passed, client gone); the loop records and re-raises."""


@dataclass
class TurnRequest:
    """One question for one session, with the images it brings."""

    session_id: str
    text: str
    images: list[Image.Image] = field(default_factory=list)
    base: str = ""  # URL prefix for image URLs ("" for paths relative to the server)


class TurnHandle:
    """The events of one running turn, as JSON dicts, ending with an "answer" or an "error" event."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.cancel = threading.Event()
        self._events: queue.Queue[Any] = queue.Queue()

    def put(self, event: dict[str, Any]) -> None:
        """Add an event (from the worker)."""
        self._events.put(event)

    def close(self) -> None:
        """No more events (from the worker)."""
        self._events.put(_DONE)

    def events(self) -> Iterator[dict[str, Any]]:
        """The events as they come, until the turn ends; leaving early cancels the turn."""
        try:
            while True:
                item = self._events.get()
                if item is _DONE:
                    return
                yield item
        finally:
            self.cancel.set()  # a no-op once the turn is over

    def result(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Wait for the turn: (the answer event, every event), or raise the ServeError of its error event."""
        seen: list[dict[str, Any]] = []
        wait_until = self.deadline + 30.0  # the worker notices the deadline at the turn's next event
        while True:
            try:
                item = self._events.get(timeout=max(0.1, wait_until - time.monotonic()))
            except queue.Empty:
                self.cancel.set()
                raise ServeError(504, "timeout", "the turn did not end within the per-request time") from None
            if item is _DONE:
                break
            seen.append(item)
        last = (
            seen[-1]
            if seen
            else {"type": "error", "status": 500, "kind": "no_answer", "message": "no events"}
        )
        if last["type"] == "error":
            raise ServeError(last["status"], last["kind"], last["message"])
        return last, seen


class TurnRunner:
    """A pool of `workers` threads with room for `queue` waiting turns."""

    def __init__(self, manager: SessionManager, config: ServeConfig):
        self.manager = manager
        self.config = config
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="toolvlm-turn")
        self._capacity = config.workers + config.queue
        self._slots = threading.BoundedSemaphore(self._capacity)
        self._count = threading.Lock()
        self.running = 0
        self.admitted = 0

    def start(self, request: TurnRequest) -> TurnHandle:
        """Admit a turn (or raise 404/409/429) and run it on a worker."""
        lock = self.manager.acquire(request.session_id)
        if not self._slots.acquire(blocking=False):
            lock.release()
            raise ServeError(
                429,
                "queue_full",
                f"the server is busy: {self._capacity} turns are running or waiting "
                f"({self.config.workers} workers, queue {self.config.queue}); retry in a few seconds",
                headers={"Retry-After": "5"},
            )
        with self._count:
            self.admitted += 1
        handle = TurnHandle(time.monotonic() + self.config.turn_timeout_s)
        try:
            self._pool.submit(self._run, request, handle, lock)
        except RuntimeError:  # the pool is shut down
            self._release(lock)
            raise ServeError(503, "shutting_down", "the server is shutting down") from None
        return handle

    def _release(self, lock: threading.Lock) -> None:
        with self._count:
            self.admitted -= 1
        self._slots.release()
        lock.release()

    def stats(self) -> dict[str, int]:
        """Turns running and waiting now."""
        with self._count:
            return {
                "running": self.running,
                "waiting": self.admitted - self.running,
                "capacity": self._capacity,
            }

    def _run(self, request: TurnRequest, handle: TurnHandle, lock: threading.Lock) -> None:
        with self._count:
            self.running += 1
        try:
            self._turn(request, handle)
        finally:
            with self._count:
                self.running -= 1
            self._release(lock)
            handle.close()

    def _turn(self, request: TurnRequest, handle: TurnHandle) -> None:
        sid = request.session_id
        if time.monotonic() > handle.deadline:
            handle.put(
                _error(503, "timeout", "the turn waited in the queue past the per-request time; retry")
            )
            return
        if handle.cancel.is_set():
            return
        bot = None
        try:
            bot = self.manager.assistant(sid)
            first = len(bot.handles)  # the user's images get the next handles, in order
            user = [f"img_{first + i}" for i in range(len(request.images))]
            handle.put({"type": "turn", "session": sid, "images": image_refs(sid, user, request.base)})
            events = bot.stream(request.text, request.images)
            for event in events:
                data = event_json(event, sid, request.base)
                handle.put(data)
                if data["type"] == "answer":
                    continue
                if handle.cancel.is_set():
                    events.throw(TurnCancelled("the client went away"))
                elif time.monotonic() > handle.deadline:
                    events.throw(TurnCancelled(f"the turn ran past {self.config.turn_timeout_s:g} s"))
        except TurnCancelled as stop:
            if bot is not None:
                close_turn(bot, "cancelled", f"cancelled: {stop}")
            timeout = not handle.cancel.is_set()
            kind, status = ("timeout", 504) if timeout else ("cancelled", 499)
            handle.put(_error(status, kind, f"{stop}; the steps so far are kept in session {sid}"))
        except ServeError as err:
            handle.put(_error(err.status, err.kind, err.message))
        except Exception as err:  # a tool or the controller failed: report it, keep the session usable
            logger.exception("turn of session %s failed", sid)
            if bot is not None:
                close_turn(bot, "error", f"the turn failed: {type(err).__name__}: {err}")
            self.manager.forget(sid)
            handle.put(_error(500, "turn_failed", f"the turn failed: {type(err).__name__}: {err}"))

    def shutdown(self) -> None:
        """Stop taking turns; cancel waiting ones."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _error(status: int, kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "status": status, "kind": kind, "message": message}
