"""`toolvlm chat`: a terminal chat over images.

    toolvlm chat [--image PATH ...] [--profile NAME_OR_PATH] [--session DIR]

Replies stream token by token; each tool call and its result is shown, and the images tools make are written
to the session folder with their paths printed. Commands: /image PATH, /images, /trace, /save [PATH], /reset,
/help, /quit. Ctrl-C during a reply cancels that reply, not the session; Ctrl-D (end of input) leaves. Every
error a command or a turn can raise is reported in one line and the REPL goes on (a question refused by its
checks keeps the images attached; a turn stopped by a full disk or a tool's bug keeps every step saved before it).

`ChatREPL` takes its input and output as callables, so tests drive it with scripted lines and read the whole
transcript; `run` wires it to the terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from .assistant import Assistant
from .events import AnswerEvent, Event, TokenEvent, ToolCallEvent, ToolResultEvent
from .loop import UserInputError, load_image_file
from .profiles import ProfileError
from .session import SessionError, SessionStore, SessionWriteError, new_session_dir
from .trajectory import AssistantStep, EndStep, ToolStep, UserStep

HELP = {
    "image": "/image PATH      attach an image to your next message",
    "images": "/images          list the images of the session with their handles and files",
    "trace": "/trace           show every step of the conversation",
    "save": "/save [PATH]     write the conversation as one JSON file (the session folder is always up to date)",
    "reset": "/reset           start a new conversation (the old one moves to the session's archive/)",
    "help": "/help            this list",
    "quit": "/quit            leave (Ctrl-D too)",
}

logger = logging.getLogger(__name__)


class ChatREPL:
    """The chat loop over an Assistant, reading lines with `read(prompt)` and writing text with `write(text)`."""

    def __init__(self, assistant: Assistant, read: Callable[[str], str], write: Callable[[str], None]):
        self.assistant = assistant
        self.read = read
        self._write = write
        self.pending: list[tuple[str, object]] = []  # (path, image) attached to the next message
        self._at_line_start = True
        self.commands: dict[str, Callable[[str], bool]] = {
            "image": self.cmd_image,
            "images": self.cmd_images,
            "trace": self.cmd_trace,
            "save": self.cmd_save,
            "reset": self.cmd_reset,
            "help": self.cmd_help,
            "quit": lambda _arg: False,
            "exit": lambda _arg: False,
        }

    # -- output -------------------------------------------------------------------------------------------

    def write(self, text: str) -> None:
        """Write text as it is (streamed tokens)."""
        if text:
            self._write(text)
            self._at_line_start = text.endswith("\n")

    def say(self, line: str) -> None:
        """Write one line, starting a new line first if needed."""
        if not self._at_line_start:
            self.write("\n")
        self.write(line + "\n")

    # -- the loop -----------------------------------------------------------------------------------------

    def loop(self, images: list[str] | None = None) -> int:
        """Read and answer lines until /quit or end of input; returns the exit status."""
        folder = self.assistant.session_dir
        self.say(f"toolvlm chat - session folder: {folder}" if folder else "toolvlm chat")
        if len(self.assistant.trajectory):
            n_images = len(self.assistant.handles)
            self.say(f"resumed {len(self.assistant.trajectory)} steps and {n_images} images")
        note = self.assistant.domain_note  # with a domain check (the default bundle): what its models know
        if note:
            self.say(note)
        self.say("type /help for commands, Ctrl-D to leave")
        for path in images or []:
            self.cmd_image(path)
        if not self.assistant.trajectory.turn_finished():
            self.say("finishing the interrupted turn")
            self.show(self.assistant.agent.resume())
        while True:
            try:
                line = self.read("> ")
            except EOFError:
                self.say("")
                return 0
            except KeyboardInterrupt:  # at the prompt: drop the line
                self.say("")
                continue
            line = line.strip()
            if line.startswith("/"):
                name, _, arg = line[1:].partition(" ")
                command = self.commands.get(name)
                if command is None:
                    self.say(f"unknown command /{name}; commands are: " + ", ".join(f"/{c}" for c in HELP))
                elif not self.run_command(name, command, arg.strip()):
                    return 0
            elif line:
                self.ask(line)

    def run_command(self, name: str, command: Callable[[str], bool], arg: str) -> bool:
        """Run one /command; any error it raises is reported and the REPL goes on."""
        try:
            return command(arg)
        except KeyboardInterrupt:
            self.say(f"/{name} cancelled")
        except Exception as err:  # noqa: BLE001 - a REPL reports every failure of a command and goes on
            logger.debug("/%s failed", name, exc_info=True)
            self.say(f"/{name} failed: {describe_error(err)}")
        return True

    def ask(self, line: str) -> None:
        """Send one message with the attached images; a message its checks refuse keeps the images attached."""
        pending, self.pending = self.pending, []
        refused = self.show(self.assistant.stream(line, [image for _, image in pending]))
        if refused:
            self.pending = pending + self.pending

    def show(self, events: Iterator[Event]) -> bool:
        """Render a turn's events; Ctrl-C cancels the turn, and an error stops it, reported in one line.
        Returns True when the turn was refused before it started (UserInputError)."""
        try:
            for event in events:
                self.render(event)
        except KeyboardInterrupt:
            self.say("[cancelled]")
        except UserInputError as err:
            self.say(f"not sent: {err}")
            return True
        except SessionWriteError as err:
            self.say(f"[stopped: {err}]")
        except Exception as err:  # noqa: BLE001 - a bug in a tool or the controller: report, keep the session
            logger.debug("the turn failed", exc_info=True)
            folder = self.assistant.session_dir
            kept = f"; every step before it is saved in {folder}" if folder else ""
            self.say(f"[stopped by an error: {describe_error(err)}{kept}]")
        return False

    def render(self, event: Event) -> None:
        """Write one event."""
        if isinstance(event, TokenEvent):
            self.write(event.text)
        elif isinstance(event, ToolCallEvent):
            self.say(f"  -> {event.call.short()}")
        elif isinstance(event, ToolResultEvent):
            step = event.step
            mark = "!!" if step.error else "<-"
            named = (
                step.content
                if step.name and step.content.startswith(f"{step.name}:")
                else f"{step.name or 'call'}: {step.content}"
            )
            self.say(f"  {mark} {named}")
            for handle, path in zip(step.images, event.paths, strict=False):
                self.say(f"     {handle}: {path}")
        elif isinstance(event, AnswerEvent):
            if event.finish != "answer":
                self.say(f"[{event.text}]")
            self.say("")

    # -- commands (each returns False to leave) -------------------------------------------------------------

    def cmd_image(self, arg: str) -> bool:
        """Attach an image to the next message."""
        if not arg:
            self.say("usage: /image PATH")
            return True
        try:
            image = load_image_file(arg)
        except UserInputError as err:
            self.say(f"cannot attach: {err}")
            return True
        self.pending.append((arg, image))
        handle = f"img_{len(self.assistant.handles) + len(self.pending) - 1}"
        self.say(f"attached {arg} as {handle} ({image.width}x{image.height}); it goes with your next message")
        return True

    def cmd_images(self, _arg: str) -> bool:
        """List the session's images."""
        agent = self.assistant.agent
        if not agent.memory.handles and not self.pending:
            self.say("no images yet; attach one with /image PATH")
        for record in agent.memory.records:
            path = agent.image_path(record.handle)
            where = f" {path}" if path else ""
            self.say(
                f"{record.handle}  {record.image.width}x{record.image.height}  from {record.source}{where}"
            )
        for path, _ in self.pending:
            self.say(f"(pending) {path}")
        return True

    def cmd_trace(self, _arg: str) -> bool:
        """Show every step of the conversation."""
        for i, step in enumerate(self.assistant.trajectory):
            self.say(f"[{i}] {describe_step(step)}")
        if not len(self.assistant.trajectory):
            self.say("no steps yet")
        return True

    def cmd_save(self, arg: str) -> bool:
        """Write the conversation as one JSON file."""
        folder = self.assistant.session_dir or Path(".")
        path = Path(arg).expanduser() if arg else folder / "trajectory.json"
        if path.is_dir():
            self.say(
                f"cannot save: {path} is a folder; give a file path, e.g. /save {path / 'trajectory.json'}"
            )
            return True
        text = json.dumps(self.assistant.trajectory.to_dict(), indent=1, ensure_ascii=False)
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self.say(f"cannot save to {path}: {err.strerror or err}")
            return True
        self.say(f"saved {len(self.assistant.trajectory)} steps to {path}")
        return True

    def cmd_reset(self, _arg: str) -> bool:
        """Start a new conversation."""
        self.assistant.reset()
        self.pending = []
        self.say("new conversation; images start again at img_0")
        return True

    def cmd_help(self, _arg: str) -> bool:
        """List the commands."""
        for line in HELP.values():
            self.say(line)
        return True


def describe_error(err: BaseException) -> str:
    """One line about an error: its sentence, with the type when the sentence alone would be unclear."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, ValueError | OSError) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def describe_step(step: object) -> str:
    """One line about a step, for /trace."""
    if isinstance(step, UserStep):
        images = f" [{', '.join(step.images)}]" if step.images else ""
        return f"user: {step.text}{images}"
    if isinstance(step, AssistantStep):
        flag = " (cancelled)" if step.cancelled else ""
        return f"assistant{flag}: {step.text}"
    if isinstance(step, ToolStep):
        images = f" [{', '.join(step.images)}]" if step.images else ""
        status = "error" if step.error else "ok"
        return f"tool {step.name or '-'} {json.dumps(step.arguments)} -> {status}: {step.content}{images}"
    if isinstance(step, EndStep):
        return f"end ({step.finish}): {step.text}"
    return repr(step)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments of `toolvlm chat`."""
    parser.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="attach an image (repeatable)"
    )
    parser.add_argument(
        "--profile", default=None, help="a profile YAML path or name (default: the default bundle)"
    )
    parser.add_argument(
        "--session", default=None, metavar="DIR", help="session folder; an existing one is resumed"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="controller replies per turn")
    parser.add_argument(
        "--constrained", action="store_true", help="constrain tool-call JSON to the tools' schemas"
    )


def open_session(folder: Path) -> tuple[SessionStore, list[str]]:
    """The session folder opened for writing (locked) and read once, so that its problems show before a model
    loads; with the handles of the images it holds."""
    store = SessionStore(folder)
    return store, store.load()[1].handles


def agent_options(args: argparse.Namespace) -> dict:
    """Agent options given on the command line."""
    options: dict = {}
    if getattr(args, "max_steps", None) is not None:
        options["max_steps"] = args.max_steps
    if getattr(args, "constrained", False):
        options["constrained"] = True
    return options


def run(args: argparse.Namespace, command: str) -> int:
    """Run `toolvlm chat`."""
    session = Path(args.session) if args.session else new_session_dir()
    try:  # the folder first (cheap): a locked, unwritable or unreadable one is refused before any model loads
        store, _ = open_session(session)
        assistant = Assistant.from_profile(args.profile, session=store, **agent_options(args))
    except (ProfileError, SessionError, SessionWriteError) as err:
        print(f"toolvlm chat: {err}", file=sys.stderr)
        return 2

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    return ChatREPL(assistant, input, write).loop(args.image)
