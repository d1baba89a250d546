"""Entry point of the world-model training stages: `python -m toolvlm.finetune.train_world STAGE [RECIPE] [k=v ...]`.

STAGE is one of `encoder`, `detector`, `captioner`, `generator`. RECIPE defaults to the packaged
`recipes/world_<stage>.yaml`; `key=value` overrides apply on top (e.g. `steps=50 run_dir=runs/try`). A run whose
`run_dir` holds a checkpoint resumes from it; `--export-only` writes `export/` from the last checkpoint without
training. Each stage module holds its config dataclass and its Stage class; they are imported lazily.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from toolvlm.recipes import load_recipe

log = logging.getLogger(__name__)

# stage -> (module, config class, stage class)
STAGES: dict[str, tuple[str, str, str]] = {
    "encoder": ("toolvlm.finetune.train_encoder", "EncoderConfig", "EncoderStage"),
    "detector": ("toolvlm.finetune.train_detector", "DetectorConfig", "DetectorStage"),
    "captioner": ("toolvlm.finetune.train_captioner", "CaptionerConfig", "CaptionerStage"),
    "generator": ("toolvlm.finetune.train_generator", "GeneratorConfig", "GeneratorStage"),
}
RECIPES = Path(__file__).parent / "recipes"


def default_recipe(stage: str) -> Path:
    """The packaged recipe of a stage."""
    return RECIPES / f"world_{stage}.yaml"


def stage_classes(stage: str) -> tuple[type, type]:
    """(config class, stage class) of a stage; raises naming the known stages."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are: {', '.join(STAGES)}")
    module_name, config_name, stage_name = STAGES[stage]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, stage_name)


def make_stage(
    stage: str, recipe: str | Path | None = None, overrides: Sequence[str] = ()
) -> tuple[Any, Any]:
    """Build (config, stage object) from a recipe (default: the packaged one) and overrides."""
    config_cls, stage_cls = stage_classes(stage)
    path = recipe if recipe is not None else default_recipe(stage)
    config = load_recipe(path, config_cls, overrides)
    return config, stage_cls(config)


def run_stage(
    stage: str, recipe: str | Path | None = None, overrides: Sequence[str] = (), export_only: bool = False
) -> Path:
    """Train (or resume) a stage and export it; returns the run folder."""
    from toolvlm.finetune.train_common import export, load_checkpoint_into, train

    config, obj = make_stage(stage, recipe, overrides)
    if export_only:
        run = Path(config.run_dir)
        step = load_checkpoint_into(obj.model, run)
        log.info("exporting %s at step %d", run, step)
        export(obj, run)
        return run
    return train(obj, config)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: STAGE [RECIPE] [key=value ...] [--export-only]."""
    parser = argparse.ArgumentParser(prog="python -m toolvlm.finetune.train_world", description=__doc__)
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("args", nargs="*", help="an optional RECIPE.yaml, then key=value overrides")
    parser.add_argument("--export-only", action="store_true", help="export the last checkpoint, no training")
    args = parser.parse_intermixed_args(argv)
    recipe = None
    overrides = list(args.args)
    if overrides and "=" not in overrides[0]:
        recipe = overrides.pop(0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = run_stage(args.stage, recipe, overrides, args.export_only)
    print(f"{args.stage}: run folder {run}, export {run / 'export'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
