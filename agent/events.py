"""Events the agent loop yields while it works: text as it streams, each call, each result, the answer.

User interfaces (the REPL, `Assistant.stream`) render these; they carry steps and images, never formatting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .protocol import ToolCall
from .trajectory import Step, ToolStep


@dataclass
class TokenEvent:
    """A piece of the reply's visible text (tool-call markup left out)."""

    text: str
    kind: str = "token"


@dataclass
class ToolCallEvent:
    """The model called a tool; it is about to run."""

    call: ToolCall
    kind: str = "tool_call"


@dataclass
class ToolResultEvent:
    """A tool ran (or a call could not be run: `step.error`); with the images it made and where they are."""

    step: ToolStep
    images: list[Image.Image] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    kind: str = "tool_result"


@dataclass
class AnswerEvent:
    """The turn is over: the answer text, the turn's steps, the handles of images made in it, and why it ended
    ("answer", "step_limit" or "retries"; Ctrl-C raises KeyboardInterrupt instead)."""

    text: str
    steps: list[Step] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    finish: str = "answer"
    kind: str = "answer"


Event = TokenEvent | ToolCallEvent | ToolResultEvent | AnswerEvent
