"""The agent loop: generate -> parse calls -> check them -> resolve image handles -> run tools -> feed back.

`Agent.run(text, images)` adds a user turn and yields events until the controller answers without a call or a
limit is hit; every step goes to the trajectory (and the session folder, when there is one) as soon as it
exists. Two kinds of error, kept apart:

- Mistakes of the model (an unparseable call, an unknown tool, invalid arguments, an unknown image handle, a
  tool reporting bad input, an empty reply, one cut at a stop string too) become `ToolStep(error=True)`
  observations the model reads next; after `max_retries` replies in a row that made only mistakes the turn
  ends with finish "retries".
- Bugs and infrastructure failures (a tool raising, the controller failing) raise; the steps before them are
  already saved, and `Agent.resume()` runs what the last reply asked for but never got.

What the user got wrong (an empty or over-long question, a handle that names no image, an image file that
cannot be read) raises `UserInputError` before anything is recorded or generated. "The image" means the latest
image the user attached: unless the user's text names a handle, a call naming an older user image is run on the
latest one (`resolve_image`).

Ctrl-C (KeyboardInterrupt) during a turn records what was generated as a cancelled reply, or ends the turn,
and re-raises, so a REPL cancels the generation and keeps the session.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from PIL import Image

from toolvlm.tools.base import ToolInputError, image_parameters, validate_arguments

from .events import AnswerEvent, Event, TokenEvent, ToolCallEvent, ToolResultEvent
from .memory import ImageMemory
from .prompting import openai_tools, system_prompt
from .protocol import STOP_STRINGS, CallTextFilter, ToolCall, parse_reply
from .session import SessionStore, jsonable
from .trajectory import AssistantStep, EndStep, Step, ToolStep, Trajectory, UserStep

logger = logging.getLogger(__name__)

MENTIONED_HANDLE = re.compile(r"\bimg_[0-9]+\b")
EMPTY_REPLY = (
    f"the reply was empty: answer in words or call a tool (a reply never starts with {STOP_STRINGS[0]}, "
    "which only the tools write)"
)


class UserInputError(ValueError):
    """Input the user got wrong (question, image file, handle); the text says what and how to fix it."""


@dataclass
class AgentConfig:
    """Limits and generation options of the loop."""

    max_steps: int = 6  # controller replies per turn
    max_retries: int = 2  # replies in a row that made only mistakes, before giving up
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    constrained: bool = False  # constrain the JSON of tool calls to the tools' schemas (local controllers)
    tool_choice: str = "auto"  # with constrained: "required" makes the first reply of a turn one valid call
    native_tools: bool | None = None  # pass schemas through tools=; None: when the controller supports it
    prompts: str = "agent"  # a prompt file of toolvlm.prompts, or a YAML path
    tool_images: bool = True  # show the controller the images tools make (False: only their handles)
    no_repeat_ngram: int = 0  # n >= 2: no n-gram of tokens twice in a reply (local controllers; 0: off)
    max_question_chars: int = 8000  # longer user messages are refused before the controller runs

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> AgentConfig:
        """Build from a mapping; unknown keys raise, naming the known ones."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown agent option(s) {unknown}; options are: {', '.join(sorted(known))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The options as a dict."""
        return asdict(self)


def load_image_file(path: str | Path) -> Image.Image:
    """An RGB image from a file the user gave; UserInputError (a ValueError) names the file and the problem."""
    from toolvlm.tools.imaging import load_image

    path = Path(path).expanduser()
    if path.is_dir():
        raise UserInputError(f"{path} is a folder, not an image file")
    if not path.is_file():
        raise UserInputError(f"image not found: {path}")
    try:
        if path.stat().st_size == 0:
            raise UserInputError(f"{path} is empty (0 bytes), not an image")
        return load_image(path)
    except ToolInputError as err:
        raise UserInputError(f"{path}: {err}") from None
    except OSError as err:  # unreadable (permissions, a device)
        raise UserInputError(f"cannot read {path}: {err.strerror or err}") from None


def check_question(text: str, config: AgentConfig) -> None:
    """Refuse an empty or over-long user message (UserInputError) before any model runs."""
    if not isinstance(text, str):
        raise UserInputError(f"the question must be text, got {type(text).__name__}")
    if not text.strip():
        raise UserInputError("the question is empty; ask something about the image(s)")
    if len(text) > config.max_question_chars:
        raise UserInputError(
            f"the question is {len(text):,} characters long; the limit is {config.max_question_chars:,} "
            "(agent option max_question_chars)"
        )


def check_mentions(text: str, handles: Sequence[str]) -> None:
    """Refuse a user message naming an image handle that is not among `handles` (UserInputError)."""
    missing = [h for h in dict.fromkeys(MENTIONED_HANDLE.findall(text)) if h not in handles]
    if missing:
        known = ", ".join(handles) or "none yet (attach one)"
        raise UserInputError(
            f"there is no image {', '.join(missing)} in this conversation; images are: {known}"
        )


class Agent:
    """A controller, its tools, the conversation so far and (optionally) the session folder it is saved in."""

    def __init__(
        self,
        controller: Any,
        tools: Mapping[str, Any] | Sequence[Any] = (),
        config: AgentConfig | None = None,
        session: SessionStore | None = None,
    ):
        self.controller = controller
        self.tools: dict[str, Any] = dict(tools) if isinstance(tools, Mapping) else {t.name: t for t in tools}
        self.config = config or AgentConfig()
        self.session = session
        self.trajectory, self.memory = (
            session.load() if session is not None else (Trajectory(), ImageMemory())
        )
        self._grammar = None
        if self.config.tool_choice not in ("auto", "required"):
            raise ValueError(f"tool_choice must be 'auto' or 'required', got {self.config.tool_choice!r}")
        if self.config.constrained:
            from .constrained import ToolCallGrammar

            tokenizer = getattr(controller, "tokenizer", None)
            if tokenizer is None:
                raise ValueError(
                    f"constrained decoding needs a controller with a tokenizer; {type(controller).__name__} "
                    "has none (use a local controller, or set constrained: false)"
                )
            self._grammar = ToolCallGrammar(tokenizer, getattr(controller, "stop_token_ids", None))

    # -- what the controller sees -------------------------------------------------------------------------

    @property
    def native_tools(self) -> bool:
        """True when tool schemas go through the chat template's `tools=`."""
        if self.config.native_tools is None:
            return bool(getattr(self.controller, "supports_tool_template", False)) and bool(self.tools)
        return self.config.native_tools and bool(self.tools)

    def schemas(self) -> list[dict[str, Any]]:
        """The schemas of the tools: {"name", "description", "parameters"} each."""
        return [tool.schema() for tool in self.tools.values()]

    def system_prompt(self) -> str:
        """The system message."""
        return system_prompt(self.schemas(), native=self.native_tools, prompts=self.config.prompts)

    def render(self) -> tuple[list[dict[str, Any]], list[Image.Image]]:
        """The messages and images the controller gets for the next reply."""
        shown = self.config.tool_images
        messages = self.trajectory.to_messages(self.system_prompt(), tool_images=shown)
        images = [self.memory.get(h) for h in self.trajectory.image_handles(tool_images=shown)]
        return messages, images

    # -- recording ----------------------------------------------------------------------------------------

    def _record(self, step: Step) -> None:
        if self.session is not None:  # on disk first: a failed write (SessionWriteError) records nothing
            self.session.append(step)
        self.trajectory.append(step)

    @contextlib.contextmanager
    def _images_kept_only_if_recorded(self) -> Iterator[None]:
        """Images added inside are forgotten again when the step naming them is not recorded (a full disk), so
        handles in memory keep matching the saved steps (their files are overwritten by the next images)."""
        length = len(self.memory)
        try:
            yield
        except BaseException:
            self.memory.truncate(length)
            raise

    def add_image(self, image: Image.Image | str | Path, source: str = "user") -> str:
        """Remember an image (saved to the session folder first) and return its handle."""
        if not isinstance(image, Image.Image):
            image = load_image_file(image)
        if self.session is not None:  # on disk first: a failed write leaves memory and folder alike
            self.session.save_image(f"img_{len(self.memory)}", image, source)
        return self.memory.add(image, source)

    def image_path(self, handle: str) -> Path | None:
        """Where the image of `handle` is saved, if there is a session folder."""
        return self.session.image_path(handle) if self.session is not None else None

    def reset(self) -> None:
        """Start a new conversation; a session folder moves the old one to its archive/."""
        if self.session is not None:
            self.session.archive()
        self.trajectory = Trajectory()
        self.memory = ImageMemory()
        reset = getattr(self.controller, "reset", None)
        if reset is not None:
            reset()

    # -- the loop -----------------------------------------------------------------------------------------

    def run(self, text: str, images: Sequence[Image.Image | str | Path] = ()) -> Iterator[Event]:
        """Add a user turn (text and images) and yield events until it is answered or ends; UserInputError
        before anything is recorded when the question or an image is wrong."""
        loaded = self.check_turn(text, images)
        with self._images_kept_only_if_recorded():
            handles = [self.add_image(im, "user") for im in loaded]
            self._record(UserStep(text=text, images=handles))
        yield from self._guarded()

    def check_turn(self, text: str, images: Sequence[Image.Image | str | Path] = ()) -> list[Image.Image]:
        """Check a user turn before it runs (question, image files, handles named): its images, loaded, or
        UserInputError."""
        check_question(text, self.config)
        loaded = [im if isinstance(im, Image.Image) else load_image_file(im) for im in images]
        arriving = [f"img_{len(self.memory) + i}" for i in range(len(loaded))]
        check_mentions(text, [*self.memory.handles, *arriving])
        return loaded

    def resolve_image(self, handle: str) -> str:
        """The handle a call's image argument is run on: "the image" is the latest image the user attached,
        so a call naming an older user image is moved to it unless the user's text named a handle."""
        turn = self.trajectory.current_turn()
        if not turn or not isinstance(turn[0], UserStep) or MENTIONED_HANDLE.search(turn[0].text):
            return handle
        user_images = [s.images for s in self.trajectory if isinstance(s, UserStep) and s.images]
        if not user_images or handle in user_images[-1]:
            return handle
        if any(handle in images for images in user_images[:-1]):
            latest = user_images[-1][-1]
            logger.info("the image: %s read as %s, the latest image the user attached", handle, latest)
            return latest
        return handle

    def resume(self) -> Iterator[Event]:
        """Finish an interrupted turn: run the calls left without results, then go on generating."""
        if self.trajectory.turn_finished():
            return
        yield from self._guarded()

    def _guarded(self) -> Iterator[Event]:
        generating: list[str] | None = None  # the text so far while a reply is being generated
        try:
            for item in self._loop():
                if isinstance(item, list):  # the generation's text buffer, shared to survive Ctrl-C
                    generating = item
                    continue
                if isinstance(item, AssistantStep):
                    generating = None
                    continue
                yield item
        except KeyboardInterrupt:
            if generating is not None:
                self._record(AssistantStep(text="".join(generating), cancelled=True))
            elif not self.trajectory.turn_finished():
                self._record(EndStep(finish="cancelled", text="cancelled by the user"))
            raise

    def _loop(self) -> Iterator[Any]:
        for item in self.trajectory.pending_calls():
            yield from self._execute(item)
        while True:
            turn = self.trajectory.current_turn()
            n_replies = sum(isinstance(s, AssistantStep) for s in turn)
            failures = _trailing_failures(turn)
            if failures > self.config.max_retries:
                last = next(s for s in reversed(turn) if isinstance(s, ToolStep))
                text = f"(gave up after {failures} replies in a row that made only mistakes; last: {last.content})"
                yield from self._end("retries", text)
                return
            if n_replies >= self.config.max_steps:
                yield from self._end("step_limit", f"(stopped after {n_replies} replies without an answer)")
                return
            buffer: list[str] = []
            yield buffer
            yield from self._generate(buffer)
            parsed = parse_reply("".join(buffer))
            errors = parsed.errors
            if not parsed.calls and not errors and not parsed.text.strip():  # (or cut at a stop string)
                errors = [EMPTY_REPLY]  # a mistake like a malformed call: an observation, then a retry
            step = AssistantStep(text="".join(buffer), calls=parsed.calls, errors=errors)
            self._record(step)
            yield step
            if step.is_answer:
                turn = self.trajectory.current_turn()
                yield AnswerEvent(parsed.text, list(turn), _made_images(turn), "answer")
                return
            for item in [*step.calls, *step.errors]:
                yield from self._execute(item)

    def _end(self, finish: str, text: str) -> Iterator[Event]:
        self._record(EndStep(finish=finish, text=text))
        turn = self.trajectory.current_turn()
        logger.info("turn ended: %s", text)
        yield AnswerEvent(text, list(turn), _made_images(turn), finish)

    def _generate(self, buffer: list[str]) -> Iterator[Event]:
        """Stream one reply into `buffer`, yielding its visible text."""
        messages, images = self.render()
        options: dict[str, Any] = {
            "max_new_tokens": self.config.max_new_tokens,
            "do_sample": self.config.do_sample,
            "temperature": self.config.temperature,
            "top_p": self.config.top_p,
            "stop": list(STOP_STRINGS),
        }
        if self.native_tools:
            options["tools"] = openai_tools(self.schemas())
        if self._grammar is not None and self.tools:
            first = not any(isinstance(s, AssistantStep) for s in self.trajectory.current_turn())
            mode = "required" if self.config.tool_choice == "required" and first else "auto"
            processor = self._grammar.logits_processor(self.schemas(), self.memory.handles, mode=mode)
            options["logits_processor"] = [processor]
        if self.config.no_repeat_ngram:  # after the grammar, which it never overrules
            from .repetition import NoRepeatReplyNGram  # imports torch: only when used, so checks stay fast

            processors = options.setdefault("logits_processor", [])
            processors.append(NoRepeatReplyNGram(self.config.no_repeat_ngram))
        visible = CallTextFilter()
        stream = self.controller.stream(messages, images, **options)
        try:
            for delta in stream:
                buffer.append(delta)
                shown = visible.push(delta)
                if shown:
                    yield TokenEvent(shown)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        tail = visible.flush()
        if tail:
            yield TokenEvent(tail)

    def _execute(self, item: ToolCall | str) -> Iterator[Event]:
        """Run one call (or report one malformed call) and record its result."""
        if isinstance(item, str):
            step = ToolStep(name="", content=item, error=True)
            self._record(step)
            yield ToolResultEvent(step)
            return
        yield ToolCallEvent(item)
        arguments, problem = self.check_call(item)
        if arguments is None:
            step = ToolStep(name=item.name, arguments=item.arguments, content=problem, error=True)
            self._record(step)
            yield ToolResultEvent(step)
            return
        logger.info("running %s", item.short())
        output = self.tools[item.name](**arguments)  # bugs raise; bad input comes back as error=True
        if not hasattr(output, "content"):
            raise TypeError(f"tool {item.name!r} returned {type(output).__name__}, not a ToolOutput")
        made = list(getattr(output, "images", None) or [])
        with self._images_kept_only_if_recorded():
            handles = [self.add_image(im, item.name) for im in made]
            step = ToolStep(
                name=item.name,
                arguments=self.run_arguments(item),
                content=output.content,
                artifact=jsonable(getattr(output, "artifact", None) or {}),
                images=handles,
                error=bool(getattr(output, "error", False)),
            )
            self._record(step)
        paths = [p for p in (self.image_path(h) for h in handles) if p is not None]
        yield ToolResultEvent(step, made, paths)

    def run_arguments(self, call: ToolCall) -> dict[str, Any]:
        """The call's arguments as run: its image handle resolved by `resolve_image` (for the record)."""
        keys = [k for k in image_parameters(self.tools[call.name].inputs) if k in call.arguments]
        if len(keys) != 1:
            return call.arguments
        return {**call.arguments, keys[0]: self.resolve_image(call.arguments[keys[0]])}

    def check_call(self, call: ToolCall) -> tuple[dict[str, Any] | None, str]:
        """Check a call against its tool's schema (the tools' own validator) and resolve image handles:
        (arguments, "") or (None, why)."""
        tool = self.tools.get(call.name)
        if tool is None:
            known = ", ".join(self.tools) or "none"
            return None, f"unknown tool {call.name!r}; tools are: {known}"
        named = [k for k in image_parameters(tool.inputs) if k in call.arguments]

        def resolve(key: str, handle: Any) -> Image.Image:
            if not isinstance(handle, str) or handle not in self.memory:
                raise ToolInputError(
                    f"argument {key!r}: unknown image {handle!r}; pass an image handle; "
                    f"{self.memory.describe_handles()}"
                )
            if len(named) == 1:  # "the image" (a call over several images keeps the ones it names)
                handle = self.resolve_image(handle)
            return self.memory.get(handle)

        try:
            return validate_arguments(tool.inputs, call.arguments, image=resolve), ""
        except ToolInputError as err:
            return None, f"{call.name}: {err}"


def _trailing_failures(turn: list[Step]) -> int:
    """How many replies in a row, at the end of the turn, made only calls that failed."""
    count, results = 0, []
    for step in reversed(turn):
        if isinstance(step, ToolStep):
            results.append(step)
        elif isinstance(step, AssistantStep):
            if results and all(r.error for r in results):
                count += 1
                results = []
            else:
                break
        else:
            break
    return count


def _made_images(turn: list[Step]) -> list[str]:
    """Handles of the images tools made in a turn."""
    return [h for s in turn if isinstance(s, ToolStep) for h in s.images]
