"""The stages the training loop trains, by name: the controller and the four world models.

Each stage is a config class (a `train_loop.TrainConfig`), a stage class (what `train_loop.train` needs:
model, batch, loss, export) and, for the world models, a packaged default recipe (`recipes/world_<stage>.yaml`).
Modules are imported lazily, so listing the stages is instant. `run_stage` builds a stage from a recipe and
`key=value` overrides and trains it (or, with `export_only`, exports its latest checkpoint). The command line is
`toolvlm train STAGE [RECIPE.yaml] [key=value ...]` (toolvlm/train_cli.py), which also runs the stages that are
not training loops (generated set, calibrations, bundle export).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RECIPES = Path(__file__).parent / "recipes"


@dataclass(frozen=True)
class StageEntry:
    """Where a stage lives: its module, config class and stage class, and a one-line help."""

    module: str
    config: str
    stage: str
    help: str
    default_recipe: str | None = None  # a file under recipes/, used when no recipe is given


STAGES: dict[str, StageEntry] = {
    "controller": StageEntry(
        "toolvlm.finetune.trainer", "ControllerConfig", "ControllerStage",
        "the VLM controller: stage 1 the projector, stage 2 LoRA (+ QLoRA); give a recipe",
    ),
    "encoder": StageEntry(
        "toolvlm.finetune.train_encoder", "EncoderConfig", "EncoderStage",
        "the world vision encoder (CLIP-style contrastive OWL-ViT)", "world_encoder.yaml",
    ),
    "detector": StageEntry(
        "toolvlm.finetune.train_detector", "DetectorConfig", "DetectorStage",
        "the open-vocabulary grounding detector (OWL-ViT heads on the encoder)", "world_detector.yaml",
    ),
    "captioner": StageEntry(
        "toolvlm.finetune.train_captioner", "CaptionerConfig", "CaptionerStage",
        "the BLIP-style captioner", "world_captioner.yaml",
    ),
    "generator": StageEntry(
        "toolvlm.finetune.train_generator", "GeneratorConfig", "GeneratorStage",
        "the layout-conditioned diffusion generator", "world_generator.yaml",
    ),
}  # fmt: skip


def default_recipe(stage: str) -> Path | None:
    """The packaged recipe of a stage (None: the stage needs one given)."""
    name = STAGES[stage].default_recipe
    return RECIPES / name if name else None


def stage_classes(stage: str) -> tuple[type, type]:
    """(config class, stage class) of a stage; raises naming the known stages."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are: {', '.join(STAGES)}")
    entry = STAGES[stage]
    module = importlib.import_module(entry.module)
    return getattr(module, entry.config), getattr(module, entry.stage)


def stage_config(stage: str, recipe: str | Path | None = None, overrides: Sequence[str] = ()) -> Any:
    """A stage's config from a recipe (default: its packaged one) and `key=value` overrides."""
    from toolvlm.finetune.train_config import load_config

    config_cls, _ = stage_classes(stage)
    return load_config(config_cls, recipe if recipe is not None else default_recipe(stage), overrides)


def make_stage(
    stage: str, recipe: str | Path | None = None, overrides: Sequence[str] = ()
) -> tuple[Any, Any]:
    """Build (config, stage object) from a recipe (default: the packaged one) and overrides."""
    config = stage_config(stage, recipe, overrides)
    return config, stage_classes(stage)[1](config)


def run_stage(
    stage: str, recipe: str | Path | None = None, overrides: Sequence[str] = (), export_only: bool = False
) -> Any:
    """Train (or resume) a stage and export it, or only export its latest checkpoint; returns a TrainResult."""
    from toolvlm.finetune.train_loop import train

    config, obj = make_stage(stage, recipe, overrides)
    if export_only:
        return export_checkpoint(obj, config)
    return train(obj, config)


def export_checkpoint(stage: Any, config: Any) -> Any:
    """Export a stage from its run's latest checkpoint (its EMA when it kept one), without training."""
    from toolvlm.finetune.train_checkpoint import load_checkpoint_into
    from toolvlm.finetune.train_loop import TrainResult, export

    run = config.run
    step = load_checkpoint_into(stage.model, run)
    if step == 0:
        raise FileNotFoundError(f"{run} holds no checkpoint to export")
    log.info("exporting %s at step %d", run, step)
    export(stage, run)
    return TrainResult(step, float("nan"), [], 0.0, run)
