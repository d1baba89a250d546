"""The Python API: `Assistant` and `Reply`.

    from toolvlm import Assistant
    bot = Assistant.from_profile("examples/profiles/llava15-owlv2-blip-sdturbo.yaml", session="my_session")
    reply = bot.chat("How many people are there?", images=["crowd.jpg"])
    print(reply.text, reply.paths)
    for event in bot.stream("Draw a box around the tree"):   # token, tool_call, tool_result, answer events
        ...

An Assistant is an `Agent` (loop.py) with a profile's controller and tools, and a session folder when asked
for one (`session=DIR` resumes what the folder holds). It adds no behaviour of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .events import AnswerEvent, Event
from .loop import Agent, AgentConfig
from .profiles import Profile, build_controller, default_profile, load_profile
from .session import SessionStore
from .trajectory import Step, Trajectory

logger = logging.getLogger(__name__)


@dataclass
class Reply:
    """The outcome of one turn: the answer text, the turn's steps, and the images tools made in it."""

    text: str
    steps: list[Step] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    handles: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)  # where those images are saved (with a session)
    finish: str = "answer"  # or "step_limit", "retries"


class Assistant:
    """A controller with tools, image memory and (optionally) a session folder."""

    def __init__(
        self,
        controller: Any,
        tools: Mapping[str, Any] | Sequence[Any] = (),
        *,
        config: AgentConfig | Mapping[str, Any] | None = None,
        session: str | Path | SessionStore | None = None,
        profile: Profile | None = None,
    ):
        if not isinstance(config, AgentConfig):
            config = AgentConfig.from_dict(config)
        if session is not None and not isinstance(session, SessionStore):
            meta = {"profile": profile.source} if profile is not None else {}
            session = SessionStore(session, meta=meta)
        self.profile = profile
        self.agent = Agent(controller, tools, config, session)

    @classmethod
    def from_profile(
        cls,
        profile: str | Path | Mapping[str, Any] | Profile | None = None,
        *,
        session: str | Path | None = None,
        tools: Mapping[str, Any] | None = None,
        **agent_options: Any,
    ) -> Assistant:
        """Build from a profile (path, name or mapping; None: the default bundle); `tools` replaces built ones."""
        parsed = (
            default_profile()
            if profile is None
            else load_profile(dict(profile) if isinstance(profile, Mapping) else profile)
        )
        options = {**parsed.agent, **agent_options}
        if tools is None:
            from toolvlm.tools.registry import build_tools

            tools = build_tools(parsed.tools)
        controller = build_controller(parsed.controller)
        return cls(controller, tools, config=options, session=session, profile=parsed)

    @classmethod
    def default(cls, session: str | Path | None = None, **agent_options: Any) -> Assistant:
        """The default bundle (a clear error while it is not built)."""
        return cls.from_profile(None, session=session, **agent_options)

    # -- conversation -------------------------------------------------------------------------------------

    def stream(self, text: str, images: Sequence[Image.Image | str | Path] = ()) -> Iterator[Event]:
        """Yield the events of one turn: tokens, tool calls, tool results, and the answer last."""
        return self.agent.run(text, images)

    def chat(self, text: str, images: Sequence[Image.Image | str | Path] = ()) -> Reply:
        """Run one turn and return its Reply."""
        return self._collect(self.agent.run(text, images))

    def resume(self) -> Reply | None:
        """Finish a turn a crash interrupted (None when the last turn is complete)."""
        if self.agent.trajectory.turn_finished():
            return None
        return self._collect(self.agent.resume())

    def _collect(self, events: Iterator[Event]) -> Reply:
        answer = None
        for event in events:
            if isinstance(event, AnswerEvent):
                answer = event
        if answer is None:  # the loop always ends with an answer event; anything else is a bug
            raise RuntimeError("the agent loop ended without an answer event")
        return self.reply_from(answer)

    def reply_from(self, event: AnswerEvent) -> Reply:
        """The Reply of an answer event (images resolved from memory, with their saved paths)."""
        images = [self.agent.memory.get(h) for h in event.images]
        paths = [p for p in (self.agent.image_path(h) for h in event.images) if p is not None]
        return Reply(event.text, event.steps, images, list(event.images), paths, event.finish)

    def reset(self) -> None:
        """Start a new conversation (the session folder keeps the old one)."""
        self.agent.reset()

    # -- state --------------------------------------------------------------------------------------------

    @property
    def trajectory(self) -> Trajectory:
        """The conversation so far."""
        return self.agent.trajectory

    @property
    def handles(self) -> list[str]:
        """Handles of every image of the session."""
        return self.agent.memory.handles

    def image(self, handle: str) -> Image.Image:
        """The image of a handle."""
        return self.agent.memory.get(handle)

    @property
    def session_dir(self) -> Path | None:
        """The session folder, if any."""
        return self.agent.session.folder if self.agent.session is not None else None
