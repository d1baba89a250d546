"""The `toolvlm` command line: one thin dispatcher.

Each subcommand lives in the package that owns it and exposes `add_arguments(parser)` and `run(args) -> int`.
This module only knows the command-line contract (names, help lines, where each command is implemented);
it imports the implementing module lazily, so `toolvlm --help` is instant.

It is also the one place where errors become exit statuses, so no command ends in a traceback: a usage error
(bad arguments, a missing or unreadable file, a bad profile or session folder, input a check refused) prints
one line naming the problem and exits 2; Ctrl-C exits 130; any other error prints one line and exits 1 (`-vv`
shows its traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from collections.abc import Sequence
from importlib.metadata import version

# name -> (module implementing it, one-line help). Order is the order of `toolvlm --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("toolvlm.agent.cli_chat", "chat over images in the terminal"),
    "ask": ("toolvlm.agent.cli_ask", "ask one question about one or more images"),
    "tools": ("toolvlm.tools.cli", "list the tools with their descriptions and input schemas"),
    "tool": ("toolvlm.tools.cli", "run one tool directly on an image"),
    "mcp": ("toolvlm.tools.mcp_server", "serve the tools over the Model Context Protocol (stdio or HTTP)"),
    "world": ("toolvlm.world.cli", "sample or render scenes of the procedurally drawn world"),
    "train": (
        "toolvlm.train_cli",
        "run a stage of making a bundle: train, calibrate, export (RECIPE, key=value)",
    ),
    "finetune": ("toolvlm.train_cli", "train the VLM controller from a YAML recipe (= train controller)"),
    "eval": ("toolvlm.evaluation.cli", "evaluate the world models or the controller"),
    "serve": ("toolvlm.serve.cli", "serve a web page and an OpenAI-compatible API (loopback by default)"),
    "demo": ("toolvlm.demo", "run the four-step crowd demo (describe, box, count, generate)"),
}


def _load(name: str):
    module_name = COMMANDS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            return None  # the command is part of the contract but not built yet
        raise


def build_parser(load_commands: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser; subcommands named in `load_commands` get their full arguments."""
    parser = argparse.ArgumentParser(prog="toolvlm", description="An agentic multimodal assistant.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--version", action="version", version=f"toolvlm {version('toolvlm')}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_line) in COMMANDS.items():
        p = sub.add_parser(name, help=help_line, description=help_line)
        if name in load_commands:
            module = _load(name)
            if module is not None:
                module.add_arguments(p, name)
            else:
                p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def usage_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean the user's input was wrong (exit 2), imported when an error needs them."""
    from toolvlm.agent.loop import UserInputError
    from toolvlm.agent.profiles import ProfileError
    from toolvlm.agent.session import SessionError, SessionWriteError
    from toolvlm.tools.base import MissingWeightsError, ToolInputError

    return (
        UserInputError,
        ProfileError,
        SessionError,
        SessionWriteError,
        ToolInputError,
        MissingWeightsError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    )


HUB_ID = re.compile(r"model folder not found: ([A-Za-z0-9][\w.-]*/[\w.-]+)$")  # org/name, not ./x


def error_line(err: BaseException) -> str:
    """One line about an error for the user."""
    text = " ".join(str(err).split()) or type(err).__name__
    hub = HUB_ID.search(text)
    if hub:  # a hub id where the profile needs a folder (nothing is downloaded at run time)
        text += (
            f" ({hub.group(1)!r} looks like a Hugging Face hub id, which cannot be reached offline: download it "
            f"once, e.g. `huggingface-cli download {hub.group(1)} --local-dir ~/models/NAME`, and set the "
            "profile's model: to that folder)"
        )
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `toolvlm` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([command] if command in COMMANDS else [])
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # argparse printed the usage error (2) or the help (0)
        return done.code if isinstance(done.code, int) else 2
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2), format="%(levelname)s %(name)s: %(message)s"
    )
    if args.verbose < 2:  # weight-loading progress bars and advisories of transformers: only with -vv
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.command is None:
        parser.print_help()
        return 0
    module = _load(args.command)
    if module is None:
        print(f"toolvlm {args.command}: not built yet in this version", file=sys.stderr)
        return 2
    try:
        return int(module.run(args, args.command) or 0)
    except BrokenPipeError:  # output piped into a reader that stopped early (e.g. `| head`)
        sys.stdout = None  # nothing more can be written; silence the interpreter's flush at exit
        return 0
    except KeyboardInterrupt:
        print(f"toolvlm {args.command}: cancelled", file=sys.stderr)
        return 130
    except Exception as err:
        if args.verbose >= 2:
            raise
        if isinstance(err, usage_errors()):
            print(f"toolvlm {args.command}: {error_line(err)}", file=sys.stderr)
            return 2
        print(
            f"toolvlm {args.command}: error: {type(err).__name__}: {error_line(err)} (-vv shows the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
