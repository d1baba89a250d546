"""The Python API: `Assistant` and `Reply`.

    from toolvlm import Assistant
    bot = Assistant.from_profile("examples/profiles/llava15-owlv2-blip-sdturbo.yaml", session="my_session")
    reply = bot.chat("How many people are there?", images=["crowd.jpg"])
    print(reply.text, reply.paths)
    for event in bot.stream("Draw a box around the tree"):   # token, tool_call, tool_result, answer events
        ...

An Assistant is an `Agent` (loop.py) with a profile's controller and tools, and a session folder when asked
for one (`session=DIR` resumes what the folder holds). It adds one behaviour: with an out-of-domain check (a
profile's `domain: {stats: FILE}`, as the default bundle has; tools/domain.py), a turn whose attached image is not
from the world the models were trained on is answered plainly, without running the controller: the models know
only their drawn world, and real checkpoints come with a profile (`OUT_OF_DOMAIN`; the turn ends with finish
"out_of_domain", and the image stays in the session). `DOMAIN_NOTE` says the same for a chat banner.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .events import AnswerEvent, Event
from .loop import Agent, AgentConfig, load_image_file
from .profiles import Profile, build_controller, default_profile, load_profile
from .session import SessionStore
from .trajectory import EndStep, Step, Trajectory, UserStep

logger = logging.getLogger(__name__)

EXAMPLE_PROFILE = "examples/profiles/llava15-owlv2-blip-sdturbo.yaml"
OUT_OF_DOMAIN = (
    "{which} does not look like the drawn world the default models were trained on (flat-coloured people, "
    "trees, dogs, cars, houses and the like on a park, grass or street), so I cannot describe, count or edit it "
    "reliably: the default models know only that world. For real photographs, use real checkpoints through a "
    f"profile, e.g. `toolvlm chat --profile {EXAMPLE_PROFILE}` or "
    f'`Assistant.from_profile("{EXAMPLE_PROFILE}")` (README: Profiles for real checkpoints).'
)
DOMAIN_NOTE = (
    "The default models know only their drawn world (flat-coloured scenes of people, trees, dogs, cars, ...); "
    "photographs are recognised and declined. For real images use real checkpoints: "
    f"--profile {EXAMPLE_PROFILE}"
)


@dataclass
class Reply:
    """The outcome of one turn: the answer text, the turn's steps, and the images tools made in it."""

    text: str
    steps: list[Step] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    handles: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)  # where those images are saved (with a session)
    finish: str = "answer"  # or "step_limit", "retries", "out_of_domain"


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
        domain: Any = None,
    ):
        if not isinstance(config, AgentConfig):
            config = AgentConfig.from_dict(config)
        if session is not None and not isinstance(session, SessionStore):
            meta = {"profile": profile.source} if profile is not None else {}
            session = SessionStore(session, meta=meta)
        self.profile = profile
        self.agent = Agent(controller, tools, config, session)
        self.domain = domain  # a tools.domain.DomainCheck, or None: no check

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
        domain = None
        if parsed.domain.get("stats"):
            from toolvlm.tools.domain import DomainCheck

            domain = DomainCheck.from_file(parsed.domain["stats"], device=parsed.domain.get("device", "cpu"))
        return cls(controller, tools, config=options, session=session, profile=parsed, domain=domain)

    @classmethod
    def default(cls, session: str | Path | None = None, **agent_options: Any) -> Assistant:
        """The default bundle (a clear error while it is not built)."""
        return cls.from_profile(None, session=session, **agent_options)

    # -- conversation -------------------------------------------------------------------------------------

    def stream(self, text: str, images: Sequence[Image.Image | str | Path] = ()) -> Iterator[Event]:
        """Yield the events of one turn: tokens, tool calls, tool results, and the answer last."""
        loaded = [im if isinstance(im, Image.Image) else load_image_file(im) for im in images]
        foreign = self.foreign_images(loaded)
        if foreign:
            return self._decline(text, loaded, foreign)
        return self.agent.run(text, loaded)

    def chat(self, text: str, images: Sequence[Image.Image | str | Path] = ()) -> Reply:
        """Run one turn and return its Reply."""
        return self._collect(self.stream(text, images))

    def foreign_images(self, images: Sequence[Image.Image]) -> list[int]:
        """Positions of the images the out-of-domain check finds foreign (none without a check)."""
        if self.domain is None or not images:
            return []
        return [i for i, image in enumerate(images) if not self.domain.check(image).in_domain]

    def _decline(self, text: str, images: list[Image.Image], foreign: list[int]) -> Iterator[Event]:
        """The turn recorded (its images kept in the session) and answered with OUT_OF_DOMAIN, no controller."""
        handles = [self.agent.add_image(image, "user") for image in images]
        names = [handles[i] for i in foreign]
        which = f"This image ({names[0]})" if len(names) == 1 else f"These images ({', '.join(names)})"
        answer = OUT_OF_DOMAIN.format(which=which)
        self.agent._record(UserStep(text=text, images=handles))
        self.agent._record(EndStep(finish="out_of_domain", text=answer))
        logger.info("declined a turn: %s out of domain", ", ".join(names))
        yield AnswerEvent(answer, list(self.agent.trajectory.current_turn()), [], "out_of_domain")

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

    @property
    def domain_note(self) -> str | None:
        """What a chat banner should say about the models' world (DOMAIN_NOTE), when the profile has the check."""
        return DOMAIN_NOTE if self.domain is not None else None

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
