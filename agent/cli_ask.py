"""`toolvlm ask IMAGE [IMAGE ...] QUESTION [--json] [--out DIR] [--profile ...]`: one question, one answer.

`--json` prints one JSON object (the command-line contract):
    {"answer": str,
     "steps": [{"tool": str, "arguments": {...}, "content": str, "artifact": {...}, "images": [path, ...]}],
     "images": [path, ...]}
`steps` are the tool results in order (a call that could not be run has its observation as content); `images`
are the files of every image the tools made, written under `--out` (a new session folder by default).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .assistant import Assistant, Reply
from .cli_chat import agent_options
from .profiles import ProfileError
from .session import new_session_dir
from .trajectory import ToolStep


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments of `toolvlm ask`."""
    parser.add_argument(
        "inputs", nargs="+", metavar="IMAGE ... QUESTION", help="image files, then the question"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--out", default=None, metavar="DIR", help="folder for the session and the images made"
    )
    parser.add_argument(
        "--profile", default=None, help="a profile YAML path or name (default: the default bundle)"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="controller replies per turn")
    parser.add_argument(
        "--constrained", action="store_true", help="constrain tool-call JSON to the tools' schemas"
    )


def reply_json(reply: Reply, assistant: Assistant) -> dict[str, Any]:
    """The contract's JSON object of a reply."""
    steps = []
    for step in reply.steps:
        if isinstance(step, ToolStep):
            paths = [str(assistant.agent.image_path(h) or h) for h in step.images]
            steps.append(
                {
                    "tool": step.name,
                    "arguments": step.arguments,
                    "content": step.content,
                    "artifact": step.artifact,
                    "images": paths,
                }
            )
    return {"answer": reply.text, "steps": steps, "images": [str(p) for p in reply.paths]}


def run(args: argparse.Namespace, command: str) -> int:
    """Run `toolvlm ask`."""
    if len(args.inputs) < 2:
        print(
            "toolvlm ask: give at least one image and a question: toolvlm ask IMAGE QUESTION", file=sys.stderr
        )
        return 2
    *images, question = args.inputs
    missing = [p for p in images if not Path(p).is_file()]
    if missing:
        print(f"toolvlm ask: image(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else new_session_dir()
    try:
        assistant = Assistant.from_profile(args.profile, session=out, **agent_options(args))
    except ProfileError as err:
        print(f"toolvlm ask: {err}", file=sys.stderr)
        return 2
    reply = assistant.chat(question, images=images)
    data = reply_json(reply, assistant)
    if args.json:
        print(json.dumps(data, ensure_ascii=False))
        return 0
    for step in data["steps"]:
        print(f"-> {step['tool']} {json.dumps(step['arguments'])}: {step['content']}")
        for path in step["images"]:
            print(f"   image: {path}")
    print(data["answer"])
    return 0 if reply.finish == "answer" else 1
