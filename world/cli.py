"""`toolvlm world sample` and `toolvlm world render`: write a dataset of world scenes, or draw one scene spec.

The only module of the world that prints; the work is done by `toolvlm.world`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Add the `sample` and `render` subcommands to the `world` parser."""
    sub = parser.add_subparsers(dest="world_command", metavar="{sample,render}", required=True)
    sample = sub.add_parser("sample", help="write N random scenes (PNG) and annotations.jsonl into a folder")
    sample.add_argument("--n", type=int, required=True, help="number of scenes")
    sample.add_argument("--seed", type=int, default=0, help="dataset seed (same seed, same files)")
    sample.add_argument("--out", type=Path, required=True, help="output folder")
    sample.add_argument("--size", type=int, default=None, help="canvas size in pixels (default 224)")
    sample.add_argument("--config", type=Path, default=None, help="WorldConfig JSON file")
    render = sub.add_parser("render", help="draw a scene spec (JSON) into a PNG")
    render.add_argument("scene", type=Path, help="scene spec: width, height, background, objects")
    render.add_argument("out", type=Path, help="output PNG")
    render.add_argument(
        "--annotations", type=Path, default=None, help="also write the scene's annotations JSON"
    )


def _error(args: argparse.Namespace, message: str) -> int:
    print(f"toolvlm world {args.world_command}: error: {message}", file=sys.stderr)
    return 2


def _load_json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{what} {path} not found") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from None


def _sample(args: argparse.Namespace) -> int:
    from toolvlm.world import WorldConfig, sample_dataset

    if args.n < 0:
        return _error(args, f"--n must be >= 0, got {args.n}")
    config = WorldConfig()
    if args.config is not None:
        data = _load_json(args.config, "config file")
        if not isinstance(data, dict):
            return _error(args, f"config file {args.config} must hold a JSON object")
        config = WorldConfig.from_dict(data)
    if args.size is not None:
        if not 32 <= args.size <= 2048:
            return _error(args, f"--size must be between 32 and 2048, got {args.size}")
        config = replace(config, width=args.size, height=args.size)
    path = sample_dataset(args.n, args.seed, args.out, config)
    print(f"wrote {args.n} scenes to {args.out} (annotations: {path})")
    return 0


def _render(args: argparse.Namespace) -> int:
    from toolvlm.world import annotate, render_scene, scene_from_spec

    spec = _load_json(args.scene, "scene file")
    scene = scene_from_spec(spec)  # type: ignore[arg-type]  # validates, raising ValueError
    args.out.parent.mkdir(parents=True, exist_ok=True)
    render_scene(scene).save(args.out)
    if args.annotations is not None:
        args.annotations.write_text(json.dumps(annotate(scene), indent=2) + "\n")
    print(f"wrote {args.out} ({scene.width}x{scene.height}, {len(scene.objects)} objects)")
    return 0


def run(args: argparse.Namespace, command: str) -> int:
    """Run `toolvlm world sample|render`; bad input gives a one-line error and exit code 2."""
    try:
        return _sample(args) if args.world_command == "sample" else _render(args)
    except ValueError as err:
        return _error(args, str(err))
