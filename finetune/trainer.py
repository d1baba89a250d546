"""The controller's stage of the training loop: LLaVA's two stages on conversations.

Stage 1 trains the projector only (caption data), stage 2 LoRA adapters on the language model plus the
projector (QLoRA: a 4-bit base), the vision tower frozen in both. `ControllerStage(config)`:

1. loads the model (`model.base` folder, or assembled from `model.spec`, or a trained `model.adapter`), freezes
   what the stage does not train;
2. renders the data through `VLM.render` and packs it (`packing.py`): micro-batch `index` is a packed row of the
   epoch it falls in (rows reshuffled per epoch), each process taking its share of the rows, so the batches are
   a pure function of the index and a resumed run sees the same data;
3. computes the loss of a packed row (`PackedForward`: no attention across conversations, vision features of a
   frozen tower encoded once per image);
4. exports the result into the run folder: stage 1 the whole model (`RUN/model`), stage 2 the adapter
   (`RUN/adapter`, pointing at its base) and, with `export_merged`, the base with the adapter folded in
   (`RUN/merged`); with eval data, the eval loss goes into `result.json`.

The loop (`train_loop.train`: steps, schedule, bf16, accumulation, DDP across processes, checkpoints, resume,
log.jsonl) is the one every stage uses. For several processes or machines, run it under accelerate:

    accelerate launch --multi_gpu --num_processes 4 -m toolvlm train controller RECIPE.yaml        # 4 GPUs (DDP)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m toolvlm train controller RECIPE.yaml
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from toolvlm.finetune.data import ConversationDataset, load_examples
from toolvlm.finetune.packing import (
    PackedBatch,
    PackedForward,
    VisionFeatureCache,
    collate_packed,
    llava_of,
    pack_groups,
)
from toolvlm.finetune.train_checkpoint import seed_everything
from toolvlm.finetune.train_config import ControllerConfig
from toolvlm.finetune.train_loop import process_state, train_device, use_bf16

logger = logging.getLogger(__name__)


def load_model(config: ControllerConfig) -> tuple[Any, str | None]:
    """The VLM to train and the saved folder it came from (None when assembled from a spec)."""
    from toolvlm.vlm import build_vlm, load_vlm

    if config.lora.qlora:
        from toolvlm.vlm.config import VLMSpec
        from toolvlm.vlm.generic import load_processor
        from toolvlm.vlm.lora import quantized_load
        from toolvlm.vlm.model import VLM

        model = quantized_load(config.model.base)
        vlm = VLM(model, load_processor(config.model.base), VLMSpec.load(config.model.base))
        vlm.source = config.model.base
        return vlm, config.model.base
    if config.model.adapter is not None:
        from toolvlm.vlm.lora import adapter_base

        return adapter_base(config.model.adapter, dtype=config.model.dtype, vision=config.model.vision)
    if config.model.base is not None:
        return load_vlm(config.model.base, dtype=config.model.dtype), config.model.base
    return build_vlm(config.model.spec, dtype=config.model.dtype), None


def set_trainable(vlm: Any, config: ControllerConfig) -> Any:
    """Freeze what the stage does not train (stage 1: all but the projector; stage 2: LoRA via `apply_lora`,
    started from `model.adapter`'s weights when given).

    Trainable weights are kept in fp32 (the optimizer's master copy) whatever the dtype of the frozen ones.
    """
    if config.stage == 1:
        for name, param in vlm.model.named_parameters():
            param.requires_grad = "multi_modal_projector" in name
    else:
        from toolvlm.vlm.lora import apply_lora

        vlm = apply_lora(vlm, config.lora)
        if config.model.adapter is not None:
            from toolvlm.vlm.lora import load_adapter_weights

            load_adapter_weights(vlm, config.model.adapter)
    for param in vlm.model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return vlm


class ControllerStage:
    """A controller run's model, data, loss and export, for `train_loop.train`."""

    distributed = True  # `loss` calls `self.model`, which the loop may wrap for DDP
    export_subdir = ""  # the run folder itself: RUN/model, RUN/adapter, RUN/merged

    def __init__(self, config: ControllerConfig) -> None:
        from toolvlm.vlm.config import resolve_dtype

        self.config = cfg = config
        self.state = process_state(cfg)
        device = train_device(cfg.device)
        self.bf16 = use_bf16(cfg.bf16, device)
        frozen = resolve_dtype(cfg.model.dtype)
        if not self.bf16 and frozen != torch.float32:
            raise ValueError(
                f"model.dtype={cfg.model.dtype} keeps the frozen weights in {frozen}, which needs bf16 autocast "
                f"(this run's bf16: {cfg.bf16!r}; 'auto' is off where the device has no fast bf16); use "
                "model.dtype=auto"
            )
        seed_everything(cfg.seed)
        self.run = cfg.run
        self.vlm, base = load_model(cfg)
        if (
            cfg.stage == 2 and base is None and self.state.is_main_process
        ):  # an adapter points at a saved base
            base = str(self.run / "base")
            self.vlm.save(base)
        self.base = base or str(self.run / "base")
        self.vlm = set_trainable(self.vlm, cfg)
        self.vlm.model.train()
        self.dataset = ConversationDataset(self._examples(cfg.data.train, with_world=True), self.vlm,
                                           cfg.data.max_length)  # fmt: skip
        if len(self.dataset) == 0:
            raise ValueError("no training examples left (all longer than data.max_length, or none given)")
        self.eval_dataset = (
            ConversationDataset(self._examples(cfg.data.eval), self.vlm, cfg.data.max_length)
            if cfg.data.eval
            else None
        )
        frozen_tower = not any(
            p.requires_grad for n, p in self.vlm.model.named_parameters() if "vision_tower" in n
        )
        self.features = VisionFeatureCache(
            self.vlm,
            enabled=cfg.cache_vision_features and frozen_tower,
            max_mb=cfg.feature_cache_mb,
            dtype=torch.bfloat16 if self.bf16 else None,
        )
        if cfg.gradient_checkpointing:
            llava_of(self.vlm.model).model.language_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.model: torch.nn.Module = PackedForward(self.vlm.model)
        self._epochs: list[list[list[int]]] = []
        logger.info("stage %d: %d examples, %d steps per epoch, %d process(es)", cfg.stage, len(self.dataset),
                    self.steps_per_epoch(), self.state.num_processes)  # fmt: skip

    def _examples(self, sources: list[str], with_world: bool = False) -> list[Any]:
        sources = list(sources)
        if with_world and self.config.data.world is not None:
            sources.append(str(self._world_data()))
        return load_examples(sources)

    def _world_data(self) -> Path:
        from toolvlm.finetune.build_world import build_world_dataset

        folder = self.run / "data" / "world"
        path = folder / "world.jsonl"
        if self.state.is_main_process and not path.is_file():
            build_world_dataset(folder, self.config.data.world)
        self.state.wait_for_everyone()
        return path

    # -- data ---------------------------------------------------------------------------------------------

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """This process's packed rows of an epoch; every process gets as many, so that DDP stays in step."""
        while len(self._epochs) <= epoch:
            cfg, e = self.config, len(self._epochs)
            groups = pack_groups(self.dataset.lengths, cfg.pack_tokens, cfg.seed + e, cfg.packing)
            world, rank = self.state.num_processes, self.state.process_index
            usable = len(groups) // world * world
            self._epochs.append(groups[:usable][rank::world])
        return self._epochs[epoch]

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over this process's rows."""
        return max(1, len(self.epoch_rows(0)) // self.config.grad_accum)

    def total_steps(self) -> int:
        """The steps of `epochs` passes over the data (used when `steps` is 0)."""
        return max(1, math.ceil(self.config.epochs * self.steps_per_epoch()))

    def batch(self, index: int) -> PackedBatch:
        """The packed row of micro-batch `index`: the rows of the epochs run on one after another."""
        epoch = 0
        while index >= len(self.epoch_rows(epoch)):
            if not self.epoch_rows(epoch):
                raise ValueError("no packed rows for this process (fewer rows than processes)")
            index -= len(self.epoch_rows(epoch))
            epoch += 1
        return collate_packed([self.dataset[i] for i in self.epoch_rows(epoch)[index]])

    # -- loss ---------------------------------------------------------------------------------------------

    def _forward(self, forward: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
        device = next(forward.parameters()).device
        features = self.features.get(batch.images, batch.image_keys)
        return forward(
            batch.input_ids.to(device), batch.position_ids.to(device),
            None if features is None else features.to(device),
            batch.label_positions.to(device), batch.targets.to(device),
        )  # fmt: skip

    def loss(self, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The mean next-token loss over the row's supervised positions."""
        return self._forward(self.model, batch), {}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the eval data (None without eval data)."""
        if self.eval_dataset is None:
            return None
        device = next(self.model.parameters()).device
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if self.bf16
            else torch.autocast(device.type, enabled=False)
        )
        self.model.eval()
        losses = []
        for i in range(len(self.eval_dataset)):
            with autocast:
                losses.append(float(self._forward(self.model, collate_packed([self.eval_dataset[i]]))))
        self.model.train()
        return sum(losses) / len(losses)

    # -- export -------------------------------------------------------------------------------------------

    def export(self, folder: Path) -> dict[str, Any]:
        """Stage 1: the whole model (`model/`); stage 2: the adapter (`adapter/`, and `merged/` with
        `export_merged`); returns the eval loss."""
        folder = Path(folder)
        self.model.restore_attention()
        self.vlm.model = self.model.model
        evaluation = self.evaluate()
        self.vlm.model.eval()
        if self.config.stage == 1:
            self.vlm.save(folder / "model")
        else:
            from toolvlm.vlm.lora import merge_adapter, save_adapter

            save_adapter(self.vlm, folder / "adapter", base=self.base)
            if self.config.export_merged:
                merge_adapter(self.vlm)
                self.vlm.save(folder / "merged")
        logger.info("vision cache: %d hits, %d misses", self.features.hits, self.features.misses)
        return {"eval_loss": evaluation}


def train_controller(config: ControllerConfig) -> Any:
    """Run (or resume) one controller run; returns the loop's `TrainResult`."""
    from toolvlm.finetune.train_loop import train

    return train(ControllerStage(config), config)
