"""`toolvlm tools [--json]` and `toolvlm tool NAME IMAGE [key=value ...] [--json] [--out DIR] [--profile PATH]`.

The only module of tools/ that prints. A profile is a YAML file whose `tools:` mapping is a `build_tools` spec
(other keys, e.g. `controller:`, are ignored; relative `model:` paths are taken from the profile's folder);
without one, the default bundle's tools run. Everything a user can get wrong (the profile, key=value, JSON
values, the image, the arguments, --out) is checked before any model loads and exits with status 2 and one
line saying what to change; a tool reporting bad input exits with 1. Values of `key=value` are read as JSON when they parse
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

from toolvlm.tools import hf, imaging, registry
from toolvlm.tools.base import IMAGE_FORMAT, MissingWeightsError, ToolInputError, image_parameters

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


class UsageError(ValueError):
    """A command line that cannot run (exit status 2); the text says what to change."""


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """`key=value` strings -> a dict; values parse as JSON when they can, else stay text. A value that starts
    like a JSON object or list but does not parse raises UsageError saying where it breaks."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(
                f"expected key=value, got {item!r} (e.g. phrase=person or 'changes={{\"person\": 2}}')"
            )
        if not key.isidentifier():
            raise UsageError(
                f"{key!r} is not an argument name (in {item!r}); names are like phrase or threshold"
            )
        if key in out:
            raise UsageError(f"argument {key!r} is given twice")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError as err:
            if value.lstrip()[:1] in ("{", "["):
                raise UsageError(
                    f"argument {key!r}: {value!r} is not valid JSON ({err.msg} at character {err.pos}); "
                    "quote it for the shell, e.g. 'changes={\"person\": 2}'"
                ) from None
            out[key] = value
        except RecursionError:
            raise UsageError(f"argument {key!r}: the JSON value is nested too deeply") from None
    return out


def load_profile(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """The `tools:` spec of a YAML profile ({} without a profile), each tool's options type-checked against its
    constructor (toolvlm.tools.options) and its relative `model:` paths taken from the profile's own folder;
    raises UsageError naming the file and the key when it cannot be read or does not check."""
    if path is None:
        return {}
    import yaml

    from toolvlm.config import load_yaml
    from toolvlm.tools.options import option_problems

    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "not found"
        raise UsageError(
            f"profile {str(path)!r} {what} (give the path of a YAML file with a 'tools:' mapping)"
        )
    try:
        data = load_yaml(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UsageError(f"profile {file}: not valid YAML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"profile {file}: cannot read it: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"profile {file}: expected a mapping with 'tools:', got {type(data).__name__}")
    spec = data.get("tools") or {}
    problems = option_problems(spec)
    if problems:
        raise UsageError(f"profile {file}: " + "; ".join(problems))
    return {
        str(name): {**options, "model": hf.resolve_model(options["model"], file.parent)}
        if "model" in options
        else dict(options or {})
        for name, options in spec.items()
    }


def default_spec() -> dict[str, dict[str, Any]]:
    """The default bundle's tools (the `tools:` of its profile.yaml), so that `toolvlm tool` needs no profile;
    {} when the bundle ships none (each in-house backend then finds its own bundle part, or says how to
    configure one)."""
    from toolvlm import bundle

    shipped = bundle.bundle_dir() / bundle.PROFILE
    return load_profile(shipped) if shipped.is_file() else {}


def check_out_dir(out: str | Path) -> str | None:
    """Why images could not be written to the folder `out` (None when they can), seen before any model runs."""
    folder = Path(out).expanduser()
    if folder.exists():
        if not folder.is_dir():
            return f"--out {str(out)!r} is a file, not a folder"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"--out {str(out)!r}: the folder is not writable"
        return None
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"--out {str(out)!r}: {str(parent)!r} is a file, so the folder cannot be made"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--out {str(out)!r}: cannot make the folder ({str(parent)!r} is not writable)"
    return None


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


def _tools_for(name: str, profile: str | None) -> dict[str, Any]:
    """The tools needed to run `name`: it and, for the counter and the generator, the grounding tool they use
    (from the profile, else the default bundle's). Raises UsageError naming the profile and key."""
    spec = load_profile(profile) if profile is not None else default_spec()
    if name not in registry.names():
        raise UsageError(f"unknown tool {name!r}; tools are: {', '.join(registry.names())}")
    needed = {name: spec.get(name) or {}}
    uses_grounding = name == "generator" or (name == "counter" and "model" not in needed[name])
    if uses_grounding and "grounding" in spec:  # build_tools links it (a similar image, counting)
        needed["grounding"] = spec["grounding"] or {}
    source = f"profile {profile}" if profile is not None else "the default bundle's profile"
    others = {k: v for k, v in spec.items() if k not in needed}  # checked too, but their weights not sought
    problems = hf.spec_problems(needed) + hf.spec_problems(others, check_models=False)
    if problems:
        raise UsageError(f"{source}: " + "; ".join(problems))
    try:
        return registry.build_tools(needed)
    except MissingWeightsError as err:
        raise UsageError(str(err)) from None
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{source}: {err.args[0] if err.args else err}") from None


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
        problem = check_out_dir(args.out or DEFAULT_OUT)
        if problem:
            raise UsageError(problem)
        tool = _tools_for(args.name, args.profile)[args.name]
        shown = dict(arguments)
        if image not in (None, "-"):
            params = image_parameters(tool.inputs)
            if not params:
                raise UsageError(f"{args.name} takes no image; use '-' for IMAGE")
            if params[0] in arguments:
                raise UsageError(f"the image is given twice: as IMAGE and as {params[0]}=")
            arguments[params[0]] = imaging.load_image(image)  # before any model loads
            shown[params[0]] = image
        arguments = tool.validate(arguments)
    except (UsageError, ToolInputError) as err:
        print(f"toolvlm tool: {err}", file=sys.stderr)
        return 2
    try:
        output = tool(**arguments)
    except MissingWeightsError as err:
        print(f"toolvlm tool: {err}", file=sys.stderr)
        return 2
    paths = []
    if output.images:
        folder = Path(args.out or DEFAULT_OUT).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for picture in output.images:
                path = _unique(folder, args.name)
                picture.save(path)
                paths.append(str(path))
        except OSError as err:
            print(output.content)
            print(f"toolvlm tool: cannot write the image to {str(folder)!r}: {err}", file=sys.stderr)
            return 1
    if args.json:
        shown = {
            k: (str(v) if not isinstance(v, int | float | str | list | dict | bool) else v)
            for k, v in shown.items()
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
