"""`toolvlm ask IMAGE [IMAGE ...] QUESTION [--json] [--out DIR] [--profile ...]`: one question, one answer.

`--json` prints one JSON object (the command-line contract):
    {"answer": str,
     "steps": [{"tool": str, "arguments": {...}, "content": str, "artifact": {...}, "images": [path, ...]}],
     "images": [path, ...],
     "finish": "answer" | "step_limit" | "retries" | "cancelled" | "error",
     "error": str}                       # only with finish "error"
`steps` are the tool results in order (a call that could not be run has its observation as content); `images`
are the files of every image the tools made, written under `--out` (a new session folder by default).

Everything that can be checked cheaply (the question, the image files, the output folder and its lock, the
profile) is checked before any model loads. Exit status (EXIT_CODES): 0 an answer; 1 the turn ended without one
(step limit, repeated mistakes); 2 a usage error, nothing run; 3 an error stopped the turn (a tool's bug, a full
disk; the steps before it are saved); 130 cancelled with Ctrl-C. With `--json` the object is printed in every
case but a usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .assistant import Assistant
from .cli_chat import agent_options, describe_error, open_session
from .loop import AgentConfig, UserInputError, check_mentions, check_question, load_image_file
from .profiles import ProfileError, default_profile, load_profile
from .session import SessionError, SessionWriteError, new_session_dir
from .trajectory import Step, ToolStep

logger = logging.getLogger(__name__)

EXIT_CODES = {"answer": 0, "step_limit": 1, "retries": 1, "usage": 2, "error": 3, "cancelled": 130}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments of `toolvlm ask`."""
    parser.add_argument(
        "inputs", nargs="+", metavar="IMAGE ... QUESTION", help="image files, then the question"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(  # --session as in `toolvlm chat`; --out kept as its old name
        "--session",
        "--out",
        dest="out",
        default=None,
        metavar="DIR",
        help="session folder (and the images made)",
    )
    parser.add_argument(
        "--profile", default=None, help="a profile YAML path or name (default: the default bundle)"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="controller replies per turn")
    parser.add_argument(
        "--constrained", action="store_true", help="constrain tool-call JSON to the tools' schemas"
    )


def reply_json(reply: Any, assistant: Assistant) -> dict[str, Any]:
    """The contract's JSON object of a reply."""
    return turn_json(reply.steps, reply.text, [str(p) for p in reply.paths], reply.finish, assistant)


def turn_json(
    steps: list[Step], answer: str, images: list[str], finish: str, assistant: Assistant
) -> dict[str, Any]:
    """The contract's JSON object of a turn's steps (a finished, cancelled or failed one)."""
    results = []
    for step in steps:
        if isinstance(step, ToolStep):
            paths = [str(assistant.agent.image_path(h) or h) for h in step.images]
            results.append(
                {
                    "tool": step.name,
                    "arguments": step.arguments,
                    "content": step.content,
                    "artifact": step.artifact,
                    "images": paths,
                }
            )
    return {"answer": answer, "steps": results, "images": images, "finish": finish}


def stopped_json(assistant: Assistant, finish: str) -> dict[str, Any]:
    """The JSON object of a turn stopped by Ctrl-C or an error: the steps it saved."""
    turn = assistant.trajectory.current_turn()
    made = [h for s in turn if isinstance(s, ToolStep) for h in s.images]
    paths = [str(p) for p in (assistant.agent.image_path(h) for h in made) if p is not None]
    return turn_json(turn, "", paths, finish, assistant)


def usage(message: str) -> int:
    """Print a usage error; nothing ran."""
    print(f"toolvlm ask: {message}", file=sys.stderr)
    return EXIT_CODES["usage"]


def run(args: argparse.Namespace, command: str) -> int:
    """Run `toolvlm ask`."""
    if len(args.inputs) < 2:
        return usage("give at least one image and a question: toolvlm ask IMAGE QUESTION")
    *image_paths, question = args.inputs
    out = Path(args.out) if args.out else new_session_dir()
    try:  # every cheap check before any model loads
        profile = default_profile() if args.profile is None else load_profile(args.profile)
        try:
            config = AgentConfig.from_dict({**profile.agent, **agent_options(args)})
        except (TypeError, ValueError) as err:
            raise ProfileError(f"{profile.source}: agent: {err}") from None
        check_question(question, config)
        images = [load_image_file(p) for p in image_paths]
        store, handles = open_session(out)
        check_mentions(question, [*handles, *(f"img_{len(handles) + i}" for i in range(len(images)))])
        assistant = Assistant.from_profile(profile, session=store, **agent_options(args))
    except (ProfileError, UserInputError, SessionError, SessionWriteError) as err:
        return usage(str(err))

    error = None
    try:
        reply = assistant.chat(question, images=images)
        data = reply_json(reply, assistant)
    except KeyboardInterrupt:
        data = stopped_json(assistant, "cancelled")
        error = f"cancelled; every step before it is saved in {assistant.session_dir}"
    except Exception as err:  # noqa: BLE001 - reported as finish "error" with the steps saved before it
        logger.debug("the turn failed", exc_info=True)
        data = stopped_json(assistant, "error")
        data["error"] = describe_error(err)
        error = f"{data['error']}; every step before it is saved in {assistant.session_dir}"
    if args.json:
        print(json.dumps(data, ensure_ascii=False))
    else:
        for step in data["steps"]:
            print(f"-> {step['tool']} {json.dumps(step['arguments'])}: {step['content']}")
            for path in step["images"]:
                print(f"   image: {path}")
        if data["answer"]:
            print(data["answer"])
    if error is not None:
        print(f"toolvlm ask: {error}", file=sys.stderr)
    return EXIT_CODES.get(data["finish"], 1)
