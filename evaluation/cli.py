"""The `toolvlm eval TARGET` subcommand: `world-models` (evaluation/world_models.py) or `controller` (evaluation/controller.py).

`toolvlm eval world-models [--json] [--n N] [--offset K] [--encoder DIR] [--detector DIR] [--captioner DIR]
[--generator DIR]` scores the in-house world models (the bundle's by default) on held-out scenes.
`toolvlm eval controller ...` is implemented in `toolvlm.evaluation.controller` (`add_arguments(parser)`,
`run(args) -> int`), imported lazily; until it exists the target says it is not built yet. `toolvlm eval
controller --shift` adds the shifted set (scenes of `shift_scenes`, requests of `shift_phrasings`) and reports
one JSON with `in_distribution` and `shifted` blocks.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from toolvlm.evaluation.world_models import PARTS

CONTROLLER_MODULE = "toolvlm.evaluation.controller"


def _controller_module():
    try:
        return importlib.import_module(CONTROLLER_MODULE)
    except ModuleNotFoundError as err:
        if err.name and CONTROLLER_MODULE.startswith(err.name):
            return None
        raise


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Targets as sub-parsers: world-models and controller."""
    targets = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    world = targets.add_parser("world-models", help="score the in-house world models on held-out scenes")
    world.add_argument("--json", action="store_true", help="print one JSON object")
    world.add_argument("--n", type=int, default=50, help="held-out scenes (default 50)")
    world.add_argument("--offset", type=int, default=0, help="first held-out scene index (fresh scenes)")
    world.add_argument("--n-generate", type=int, default=10, help="layouts to generate from (default 10)")
    world.add_argument(
        "--gen-steps",
        type=int,
        default=None,
        help="denoising steps per generated image (default: the model's)",
    )
    world.add_argument("--count-threshold", type=float, default=None, help="counter score threshold")
    world.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"parts to score, comma-separated (default: {','.join(PARTS)})",
    )
    for part in PARTS:
        world.add_argument(
            f"--{part}", metavar="DIR", default=None, help=f"{part} folder (default: the bundle's)"
        )
    controller = targets.add_parser("controller", help="score a VLM controller on tool-use episodes")
    module = _controller_module()
    if module is not None:
        module.add_arguments(controller)
    else:
        controller.add_argument("rest", nargs=argparse.REMAINDER)


def run(args: argparse.Namespace, command: str) -> int:
    """Dispatch to the target."""
    if args.target == "controller":
        module = _controller_module()
        if module is None:
            print("toolvlm eval controller: not built yet in this version", file=sys.stderr)
            return 2
        return int(module.run(args) or 0)
    from toolvlm.evaluation.world_models import EvalOptions, evaluate, summary_lines

    try:
        options = EvalOptions(
            parts=tuple(p.strip() for p in args.parts.split(",") if p.strip()),
            n=args.n,
            offset=args.offset,
            models={p: getattr(args, p) for p in PARTS},
            count_threshold=args.count_threshold,
            n_generate=args.n_generate,
            gen_steps=args.gen_steps,
        )
    except ValueError as err:
        print(f"toolvlm eval world-models: {err}", file=sys.stderr)
        return 2
    results = evaluate(options)
    if args.json:
        print(json.dumps(results))
    else:
        print("\n".join(summary_lines(results)))
    return 0
