"""The typed configuration of a controller run, and the one way every stage's recipe is read.

    toolvlm train controller finetune/recipes/controller_stage2.yaml lora.r=8 steps=200 run_dir=runs/try

`ControllerConfig` extends the loop's `TrainConfig` (train_loop: run folder, steps, schedule, precision,
checkpoints; the keys every stage shares) with `ModelConfig` (what to start from), `DataConfig` (what to train
on) and `LoRASpec` (from `toolvlm.vlm.lora`: which weights train in stage 2). It is written as `recipe.yaml` in
the run folder, so a run is rebuilt from its folder.

`load_config(cls, recipe, overrides)` reads any stage's recipe through `toolvlm.recipes.load_recipe`, after
refusing the controller keys that were renamed when the two training loops became one (`output_dir`,
`max_steps`, `optim.*`, `mixed_precision`), naming the new key. This module holds no behaviour beyond checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from toolvlm.finetune.build_world import WorldDataConfig
from toolvlm.finetune.train_loop import TrainConfig
from toolvlm.recipes import load_recipe, parse_overrides
from toolvlm.vlm.config import VLMSpec
from toolvlm.vlm.lora import LoRASpec

T = TypeVar("T")
STAGES = (1, 2)

# key path -> what replaces it (the keys of the controller's own loop before there was one loop)
RENAMED: dict[str, str] = {
    "output_dir": "run_dir",
    "max_steps": "steps (0: `epochs` passes over the data)",
    "mixed_precision": "bf16 (true, false or auto)",
    "optim.lr": "lr",
    "optim.weight_decay": "weight_decay",
    "optim.warmup_steps": "warmup_steps",
    "optim.schedule": "schedule",
    "optim.max_grad_norm": "grad_clip",
    "optim": "the top-level keys lr, weight_decay, warmup_steps, schedule and grad_clip",
}


@dataclass
class ModelConfig:
    """The model to start from: a saved VLM folder (`base`), parts to assemble (`spec`), or a trained LoRA
    adapter to continue training (`adapter`, stage 2: its base, LoRA weights and projector)."""

    base: str | None = None
    spec: VLMSpec | None = None
    adapter: str | None = None
    # with `adapter`: a vision checkpoint that replaces the tower of the adapter's base (a portable adapter), e.g.
    # the same encoder fine-tuned further or at a higher resolution; it must be as wide as the projector's input
    vision: str | None = None
    # frozen weights while training ("bfloat16" halves their memory; under bf16 autocast the arithmetic is the
    # same; "auto": bf16 where the device has fast bf16, else fp32); trainable weights are always fp32
    dtype: str = "float32"


@dataclass
class DataConfig:
    """Training data: JSONL files and session folders, plus world conversations built on first use."""

    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)
    world: WorldDataConfig | None = None  # built into RUN_DIR/data/world (once) and added to `train`
    max_length: int = 2048  # longer conversations are left out (with a warning)


@dataclass
class ControllerConfig(TrainConfig):
    """A controller run: stage 1 trains the projector only, stage 2 LoRA on the LM plus the projector."""

    run_dir: str = "runs/controller"
    steps: int = 0  # optimizer steps; 0: `epochs` passes over the data
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    device: str = "auto"
    stage: int = 2
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRASpec = field(default_factory=LoRASpec)
    packing: bool = True  # several conversations per sequence, without attention across them
    pack_tokens: int = 2048  # tokens per packed sequence (one sequence per micro-batch)
    epochs: float = 1.0
    cache_vision_features: bool = True  # frozen vision tower: encode each image once
    gradient_checkpointing: bool = (
        False  # recompute each LM layer in backward: far less memory, ~1/3 more compute
    )
    feature_cache_mb: float = 4096  # memory for cached vision features (bf16 under bf16 autocast)
    export_merged: bool = False  # stage 2: also save the base with the adapter folded in

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage not in STAGES:
            raise ValueError(f"stage must be 1 (projector) or 2 (LoRA + projector), got {self.stage!r}")
        given = [k for k in ("base", "spec", "adapter") if getattr(self.model, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of model.base (a saved VLM folder), model.spec (parts) and model.adapter "
                f"(a trained adapter to continue), got {given or 'none'}"
            )
        if self.model.adapter is not None and (self.stage != 2 or self.lora.qlora):
            raise ValueError("model.adapter continues a LoRA adapter: it needs stage 2 without qlora")
        if self.model.vision is not None and self.model.adapter is None:
            raise ValueError(
                "model.vision replaces the tower of model.adapter's base: give model.adapter too"
            )
        if self.lora.qlora and self.model.base is None:
            raise ValueError("lora.qlora needs model.base, a saved VLM folder to load in 4-bit")
        if self.pack_tokens < 16:
            raise ValueError(f"need pack_tokens >= 16, got {self.pack_tokens}")


def renamed_keys(data: dict[str, Any], where: str) -> None:
    """Raise naming the new key when a recipe (or an override) uses a key renamed in `RENAMED`."""
    for path, new in RENAMED.items():
        node: Any = data
        for part in path.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is not KeyError:
            raise ValueError(f"{where}: the key {path!r} is now {new}")


def load_config(cls: type[T], recipe: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """A stage's config from a YAML recipe (None: the class's defaults) with `key=value` overrides applied."""
    if issubclass(cls, TrainConfig):
        if recipe is not None and Path(recipe).is_file():
            renamed_keys(yaml.safe_load(Path(recipe).read_text()) or {}, str(recipe))
        renamed_keys(parse_overrides(overrides), "override")
    return load_recipe(recipe, cls, overrides)


def load_train_config(recipe: str | Path | None, overrides: Sequence[str] = ()) -> ControllerConfig:
    """A controller's config from a YAML recipe with `key=value` overrides applied."""
    return load_config(ControllerConfig, recipe, overrides)
