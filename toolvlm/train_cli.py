"""`toolvlm train STAGE [RECIPE.yaml] [key=value ...]`: every stage of making a bundle, with one override syntax.

Training stages (one training loop, finetune/train_loop.py): `controller` (a recipe is required), `encoder`,
`detector`, `captioner`, `generator` (their packaged `finetune/recipes/world_<stage>.yaml` by default). Other
stages: `generated-set` (the generator's samples for the detector), `calibrate-detector`, `calibrate-describe`
(thresholds shipped with the detector) and `export-bundle` (runs into the bundle folder). Every stage reads a
typed dataclass config from an optional YAML recipe plus dotted `key=value` overrides (`toolvlm.recipes`: values
are YAML scalars, `lora.r=8`, `lr=1e-4`, `contain=[1,0.7]`); `--print-config` prints the resolved config, and
`--export-only` exports a training stage's latest checkpoint without training. A bad key or value exits 2
naming it. `toolvlm finetune RECIPE.yaml [key=value ...]` is kept as a short alias of `toolvlm train controller`.

    toolvlm train encoder steps=50 run_dir=runs/try
    toolvlm train controller finetune/recipes/controller_stage2.yaml lora.r=8
    toolvlm train calibrate-detector detector=bundle/detector n=200 views=2
    toolvlm train export-bundle detector=runs/detector_composed2 controller=runs/controller_stage2_retry
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m toolvlm train controller RECIPE.yaml

This module knows the command line and where each stage lives; it sits above training and evaluation.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from toolvlm.finetune.train_stages import STAGES


@dataclass(frozen=True)
class Task:
    """A stage that is not a training loop: its module, config class, the function running it, a help line."""

    module: str
    config: str
    function: str
    help: str


TASKS: dict[str, Task] = {
    "generated-set": Task(
        "toolvlm.finetune.generated_set", "GeneratedSetConfig", "make_generated_set",
        "store the generator's samples of training layouts (for the detector), e.g. out=runs/generated",
    ),
    "calibrate-detector": Task(
        "toolvlm.evaluation.calibrate_detector", "CalibrateDetectorConfig", "calibrate_detector",
        "pick a detector's counting thresholds and write them into its folder, e.g. detector=DIR n=200",
    ),
    "calibrate-describe": Task(
        "toolvlm.evaluation.calibrate_describe", "CalibrateDescribeConfig", "calibrate_describe",
        "pick a detector's per-category describe thresholds and write them into its folder",
    ),
    "export-bundle": Task(
        "toolvlm.finetune.export_bundle", "ExportBundleConfig", "run_export",
        "copy finished runs into the bundle folder, e.g. detector=runs/detector controller=runs/c2",
    ),
}  # fmt: skip
ALIAS = "finetune"  # `toolvlm finetune RECIPE ...` = `toolvlm train controller RECIPE ...`


def _stage_arguments(parser: argparse.ArgumentParser, training: bool) -> None:
    parser.add_argument("args", nargs="*", metavar="[RECIPE.yaml] [key=value]",
                        help="an optional YAML recipe, then dotted key=value overrides")  # fmt: skip
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    if training:
        parser.add_argument(
            "--export-only", action="store_true", help="export the run's latest checkpoint, no training"
        )


def add_arguments(parser: argparse.ArgumentParser, command: str = "train") -> None:
    """Arguments of `toolvlm train` (a sub-command per stage) and of its alias `toolvlm finetune`."""
    if command == ALIAS:
        _stage_arguments(parser, training=True)
        parser.set_defaults(stage="controller")
        return
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, entry in STAGES.items():
        _stage_arguments(sub.add_parser(name, help=entry.help, description=entry.help), training=True)
    for name, task in TASKS.items():
        _stage_arguments(sub.add_parser(name, help=task.help, description=task.help), training=False)


def split_recipe(args: list[str]) -> tuple[str | None, list[str]]:
    """(recipe, overrides): the first argument is the recipe when it is not key=value."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    stray = [a for a in args[1:] if "=" not in a]
    if stray:
        raise ValueError(f"expected key=value overrides after the recipe, got {stray[0]!r}")
    return None, list(args)


def load_stage_config(stage: str, recipe: str | None, overrides: list[str]) -> Any:
    """The resolved config of a stage (training stage or task)."""
    from toolvlm.finetune.train_config import load_config
    from toolvlm.finetune.train_stages import stage_config

    if stage in STAGES:
        return stage_config(stage, recipe, overrides)
    task = TASKS[stage]
    return load_config(getattr(importlib.import_module(task.module), task.config), recipe, overrides)


def run(args: argparse.Namespace, command: str = "train") -> int:
    """Run one stage; prints its summary as one JSON line (on the main process)."""
    stage = args.stage
    where = f"toolvlm {command}" + ("" if command == ALIAS else f" {stage}")
    try:
        recipe, overrides = split_recipe(list(args.args))
        if stage == "controller" and recipe is None:
            raise ValueError("give a recipe, e.g. finetune/recipes/controller_stage2.yaml")
        config = load_stage_config(stage, recipe, overrides)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"{where}: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(asdict(config), sort_keys=False), end="")
        return 0
    if stage in TASKS:
        task = TASKS[stage]
        summary = getattr(importlib.import_module(task.module), task.function)(config)
        print(json.dumps({"stage": stage, **summary}))
        return 0
    return _train(stage, config, getattr(args, "export_only", False))


def _train(stage: str, config: Any, export_only: bool) -> int:
    from toolvlm.finetune.train_loop import process_state, train
    from toolvlm.finetune.train_stages import export_checkpoint, stage_classes

    obj = stage_classes(stage)[1](config)
    result = export_checkpoint(obj, config) if export_only else train(obj, config)
    if process_state(config).is_main_process:
        summary = {"stage": stage, "steps": result.steps, "loss": result.loss if result.losses else None,
                   "tokens_per_s": round(result.tokens_per_s, 1), "run": str(result.run)}  # fmt: skip
        if export_only:
            summary["export"] = str(Path(result.run) / getattr(obj, "export_subdir", "export"))
        print(json.dumps(summary))
    return 0
