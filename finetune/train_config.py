"""The typed configuration of a fine-tuning run, read from a YAML recipe with `key=value` overrides.

    toolvlm finetune finetune/recipes/controller_stage2.yaml lora.r=8 max_steps=200 output_dir=runs/try

`TrainConfig` nests `ModelConfig` (what to start from), `DataConfig` (what to train on), `LoRASpec` (from
`toolvlm.vlm.lora`: which weights train in stage 2) and `OptimConfig`. It is written as `train_config.yaml`
next to the weights, so a run is rebuilt from its folder. This module holds no behaviour beyond checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from toolvlm.finetune.build_world import WorldDataConfig
from toolvlm.recipes import load_recipe
from toolvlm.vlm.config import VLMSpec
from toolvlm.vlm.lora import LoRASpec

STAGES = (1, 2)
PRECISIONS = ("auto", "bf16", "fp16", "no")


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
    world: WorldDataConfig | None = None  # built into OUTPUT_DIR/data/world (once) and added to `train`
    max_length: int = 2048  # longer conversations are left out (with a warning)


@dataclass
class OptimConfig:
    """AdamW with warmup and a schedule from transformers' `get_scheduler`."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "cosine"
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    """A fine-tuning run: stage 1 trains the projector only, stage 2 LoRA on the LM plus the projector."""

    stage: int = 2
    output_dir: str = "runs/controller"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRASpec = field(default_factory=LoRASpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    packing: bool = True  # several conversations per sequence, without attention across them
    pack_tokens: int = 2048  # tokens per packed sequence (one sequence per micro-batch)
    grad_accum: int = 1  # micro-batches per optimizer step (per process)
    max_steps: int = 0  # optimizer steps; 0: `epochs` passes over the data
    epochs: float = 1.0
    mixed_precision: str = "auto"  # auto: bf16 where the device supports it
    cache_vision_features: bool = True  # frozen vision tower: encode each image once
    gradient_checkpointing: bool = (
        False  # recompute each LM layer in backward: far less memory, ~1/3 more compute
    )
    feature_cache_mb: float = 4096  # memory for cached vision features (bf16 under bf16 autocast)
    save_every: int = 100  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    resume: str = "auto"  # auto: the latest checkpoint in output_dir; "no"; or a checkpoint folder
    export_merged: bool = False  # stage 2: also save the base with the adapter folded in
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision is False:  # YAML reads a bare `no` as false
            self.mixed_precision = "no"
        if self.resume is False:
            self.resume = "no"
        if self.stage not in STAGES:
            raise ValueError(f"stage must be 1 (projector) or 2 (LoRA + projector), got {self.stage!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
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
        if self.grad_accum < 1 or self.pack_tokens < 16:
            raise ValueError(
                f"need grad_accum >= 1 and pack_tokens >= 16, got {self.grad_accum}, {self.pack_tokens}"
            )

    @property
    def output(self) -> Path:
        """The output folder as a path."""
        return Path(self.output_dir)


def load_train_config(recipe: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A `TrainConfig` from a YAML recipe (None: defaults) with `key=value` overrides applied."""
    return load_recipe(recipe, TrainConfig, overrides)
