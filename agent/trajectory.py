"""The trajectory: a conversation as a list of dataclass steps.

One object serves as the run log, the REPL history, the saved session (one JSON line per step) and a
fine-tuning example (`to_messages`). Steps:

- `UserStep`: the user's text and the handles of the images attached to it.
- `AssistantStep`: the controller's raw reply (tool calls included), the calls parsed from it and the mistakes
  made writing them; `cancelled` when the user interrupted the generation.
- `ToolStep`: the result of one call (or the observation about one malformed call): text for the model,
  structured artifact, handles of the images the tool made, and whether it is an error.
- `EndStep`: the agent ended a turn without an answer (step limit, too many mistakes); not a message.

Images are referred to by handle; the pixels live in the image memory and the session folder. In messages
each image appears once, where it arrived, after a text label with its handle, so the order of image parts is
the order of handles.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from .protocol import ToolCall


class _StepIO:
    """`to_dict` / `from_dict` shared by the step classes."""

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict with the step's "kind"."""
        return step_to_dict(self)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Step:
        """Rebuild a step from `to_dict` output."""
        step = step_from_dict(data)
        if not isinstance(step, cls):
            raise ValueError(f"a {data.get('kind')!r} step is not a {cls.__name__}")
        return step


@dataclass
class UserStep(_StepIO):
    """A user message with the handles of the images it brought."""

    text: str
    images: list[str] = field(default_factory=list)
    kind: ClassVar[str] = "user"

    def to_messages(self) -> list[dict[str, Any]]:
        """This step as chat messages."""
        parts = image_parts(self.images)
        if self.text or not parts:
            parts.append({"type": "text", "text": self.text})
        return [{"role": "user", "content": parts}]


@dataclass
class AssistantStep(_StepIO):
    """A reply of the controller: raw text, the calls in it, and mistakes in writing them."""

    text: str
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cancelled: bool = False
    kind: ClassVar[str] = "assistant"

    def to_messages(self) -> list[dict[str, Any]]:
        """This step as chat messages."""
        return [{"role": "assistant", "content": self.text}]

    @property
    def is_answer(self) -> bool:
        """True when the reply makes no call (well-formed or not): the turn's answer."""
        return not self.calls and not self.errors


@dataclass
class ToolStep(_StepIO):
    """The result of one tool call, or the observation about a call that could not be run."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    content: str = ""
    artifact: dict[str, Any] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)
    error: bool = False
    kind: ClassVar[str] = "tool"

    def to_messages(self, show_images: bool = True) -> list[dict[str, Any]]:
        """This step as chat messages: a `tool` message naming the images the tool made, and showing them
        to the model unless `show_images` is False."""
        text = self.content
        if self.images:
            text += "\nNew images: " + ", ".join(self.images)
        shown = image_parts(self.images) if show_images else []
        parts: list[dict[str, Any]] = [{"type": "text", "text": text}, *shown]
        message: dict[str, Any] = {"role": "tool", "content": parts}
        if self.name:
            message["name"] = self.name
        return [message]


@dataclass
class EndStep(_StepIO):
    """The agent ended a turn without an answer; `finish` says why ("step_limit" or "retries")."""

    finish: str
    text: str = ""
    kind: ClassVar[str] = "end"

    def to_messages(self) -> list[dict[str, Any]]:
        """No message: the model never saw this."""
        return []


Step = UserStep | AssistantStep | ToolStep | EndStep
STEP_TYPES: dict[str, type] = {cls.kind: cls for cls in (UserStep, AssistantStep, ToolStep, EndStep)}


def image_parts(handles: list[str]) -> list[dict[str, Any]]:
    """Message parts showing images: a text label with each handle, then the image."""
    parts: list[dict[str, Any]] = []
    for handle in handles:
        parts.append({"type": "text", "text": f"{handle}:"})
        parts.append({"type": "image"})
        parts.append({"type": "text", "text": "\n"})
    return parts


def step_to_dict(step: Step) -> dict[str, Any]:
    """A step as a JSON-serialisable dict with its "kind"."""
    data = asdict(step)
    if isinstance(step, AssistantStep):
        data["calls"] = [c.to_dict() for c in step.calls]
    return {"kind": step.kind, **data}


def step_from_dict(data: dict[str, Any]) -> Step:
    """Rebuild a step from `step_to_dict` output."""
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in STEP_TYPES:
        raise ValueError(f"unknown step kind {kind!r}; kinds are {', '.join(STEP_TYPES)}")
    if kind == "assistant":
        data["calls"] = [ToolCall.from_dict(c) for c in data.get("calls", [])]
    return STEP_TYPES[kind](**data)


class Trajectory:
    """The steps of a conversation, with views as messages and as JSON."""

    def __init__(self, steps: list[Step] | None = None):
        self.steps: list[Step] = list(steps or [])

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self):
        return iter(self.steps)

    def append(self, step: Step) -> None:
        """Add a step at the end."""
        self.steps.append(step)

    def to_messages(self, system: str | None = None, tool_images: bool = True) -> list[dict[str, Any]]:
        """Chat messages of the whole conversation, the system prompt first when given; `tool_images=False`
        names the images tools made without showing them."""
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        for step in self.steps:
            if isinstance(step, ToolStep):
                messages.extend(step.to_messages(show_images=tool_images))
            else:
                messages.extend(step.to_messages())
        return messages

    def image_handles(self, tool_images: bool = True) -> list[str]:
        """Handles of the images in `to_messages` (with the same `tool_images`), in order of appearance."""
        handles: list[str] = []
        for step in self.steps:
            if isinstance(step, UserStep) or (tool_images and isinstance(step, ToolStep)):
                handles.extend(step.images)
        return handles

    def to_dict(self) -> dict[str, Any]:
        """The trajectory as JSON: {"steps": [...]}."""
        return {"steps": [step_to_dict(s) for s in self.steps]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trajectory:
        """Rebuild a trajectory from `to_dict` output."""
        return cls([step_from_dict(s) for s in data.get("steps", [])])

    def to_example(
        self, memory: Any, system: str | None = None, tool_images: bool = True
    ) -> tuple[list[dict[str, Any]], list[Any]]:
        """(messages, images) for a model or a fine-tuning example; `memory` maps handles to images."""
        return self.to_messages(system, tool_images), [memory.get(h) for h in self.image_handles(tool_images)]

    def current_turn(self) -> list[Step]:
        """The steps from the last user message on."""
        for i in range(len(self.steps) - 1, -1, -1):
            if isinstance(self.steps[i], UserStep):
                return self.steps[i:]
        return []

    def pending_calls(self) -> list[ToolCall | str]:
        """Calls (or malformed-call messages) of the last reply that have no result yet (after a crash)."""
        turn = self.current_turn()
        for i in range(len(turn) - 1, -1, -1):
            step = turn[i]
            if isinstance(step, AssistantStep):
                if step.cancelled:
                    return []
                done = sum(1 for s in turn[i + 1 :] if isinstance(s, ToolStep))
                return [*step.calls, *step.errors][done:]
        return []

    def turn_finished(self) -> bool:
        """True when the last turn has an answer or an end (or there is no turn at all)."""
        if not self.steps:
            return True
        last = self.steps[-1]
        if isinstance(last, EndStep):
            return True
        return isinstance(last, AssistantStep) and (last.is_answer or last.cancelled)
