"""`toolvlm tools [--json]` and `toolvlm tool NAME IMAGE [key=value ...] [--json] [--out DIR] [--profile PATH]`.

The only module of tools/ that prints. A profile is a YAML file whose `tools:` mapping is a `build_tools` spec
(other keys, e.g. `controller:`, are ignored). Values of `key=value` are read as JSON when they parse
(`threshold=0.3`, `changes={"person": 2}`), else as text (`phrase=red car`). Images a tool makes are written
as PNG files to --out (default `toolvlm_out/`, created when missing; existing files are never overwritten).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from toolvlm.tools import registry
from toolvlm.tools.base import IMAGE_FORMAT, MissingWeightsError, image_parameters

DEFAULT_OUT = "toolvlm_out"


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Add the arguments of `tools` or `tool` to a subparser."""
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    if command == "tools":
        return
    parser.add_argument("name", help="the tool to run, e.g. grounding, counter, generator")
    parser.add_argument("image", nargs="?", help="the input image file ('-' for none, e.g. text-to-image)")
    parser.add_argument("assignments", nargs="*", metavar="key=value", help="tool arguments")
    parser.add_argument(
        "--out", default=None, help=f"folder for the images the tool makes (default {DEFAULT_OUT}/)"
    )
    parser.add_argument(
        "--profile", default=None, help="a YAML profile whose 'tools:' mapping configures backends"
    )


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """`key=value` strings -> a dict; values parse as JSON when they can."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_profile(path: str | None) -> dict[str, dict[str, Any]]:
    """The `tools:` spec of a YAML profile ({} without a profile)."""
    if path is None:
        return {}
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"profile {path!r} not found (give the path of a YAML file with a 'tools:' mapping)")
    data = yaml.safe_load(file.read_text()) or {}
    spec = data.get("tools", {}) if isinstance(data, dict) else None
    if not isinstance(spec, dict):
        raise ValueError(f"profile {path!r}: 'tools:' must be a mapping of tool name -> backend options")
    return spec


def _unique(folder: Path, stem: str) -> Path:
    i = 0
    while (folder / f"{stem}_{i}.png").exists():
        i += 1
    return folder / f"{stem}_{i}.png"


def _list(args: argparse.Namespace) -> int:
    tools = registry.list_tools()
    if args.json:
        print(json.dumps(tools, indent=2))
        return 0
    for t in tools:
        print(f"{t['name']}: {t['description']}")
        required = set(t["parameters"].get("required", []))
        for key, prop in t["parameters"].get("properties", {}).items():
            kind = (
                "image"
                if prop.get("format") == IMAGE_FORMAT
                else prop.get("type", "enum" if "enum" in prop else "any")
            )
            flag = "" if key in required else ", optional"
            print(f"    {key} ({kind}{flag}): {prop.get('description', '')}")
    return 0


def _run_tool(args: argparse.Namespace) -> int:
    if not getattr(args, "verbose", 0):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no weight-loading bars on stderr
    assignments = list(args.assignments)
    image = args.image
    if image is not None and "=" in image and not Path(image).exists():
        assignments.insert(0, image)  # no IMAGE given; the first word is an argument
        image = None
    try:
        arguments = parse_assignments(assignments)
        spec = load_profile(args.profile)
        spec.setdefault(args.name, {})
        tool = registry.build_tools(spec)[args.name]
    except (ValueError, KeyError) as err:
        print(f"toolvlm tool: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    if image not in (None, "-"):
        params = image_parameters(tool.inputs)
        if not params:
            print(f"toolvlm tool: {args.name} takes no image; use '-' for IMAGE", file=sys.stderr)
            return 2
        arguments.setdefault(params[0], image)
    try:
        output = tool(**arguments)
    except MissingWeightsError as err:
        print(f"toolvlm tool: {err}", file=sys.stderr)
        return 2
    paths = []
    if output.images:
        folder = Path(args.out or DEFAULT_OUT)
        folder.mkdir(parents=True, exist_ok=True)
        for picture in output.images:
            path = _unique(folder, args.name)
            picture.save(path)
            paths.append(str(path))
    if args.json:
        shown = {
            k: (str(v) if not isinstance(v, int | float | str | list | dict | bool) else v)
            for k, v in arguments.items()
        }
        print(json.dumps({"tool": args.name, "arguments": shown, **output.to_dict(paths)}))
    else:
        print(output.content)
        for path in paths:
            print(f"image: {path}")
    return 1 if output.error else 0


def run(args: argparse.Namespace, command: str) -> int:
    """Run `tools` or `tool`; returns the exit status."""
    if command == "tools":
        return _list(args)
    return _run_tool(args)
