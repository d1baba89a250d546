"""The training loop of the controller: LLaVA's two stages, with accelerate.

Stage 1 trains the projector only (caption data), stage 2 LoRA adapters on the language model plus the
projector (QLoRA: a 4-bit base), the vision tower frozen in both. `Trainer(config).train()`:

1. loads the model (`model.base` folder, or assembled from `model.spec`), freezes what the stage does not train;
2. renders the data through `VLM.render` and packs it (`packing.py`); each process takes its share of the rows;
3. steps through `Accelerator` (device placement, DDP across processes, gradient accumulation, bf16 autocast,
   also on CPU), with a progress bar showing loss and tokens/s, a `log.jsonl`, and a checkpoint every
   `save_every` steps (trainable weights, optimizer, scheduler, RNG and data position), so that `resume`
   continues at the same step with the same data and the same random numbers;
4. saves the result: stage 1 the whole model (`OUTPUT/model`), stage 2 the adapter (`OUTPUT/adapter`, pointing at
   its base) and, with `export_merged`, the base with the adapter folded in (`OUTPUT/merged`).

Run it under `accelerate launch` for several processes or machines; accelerate's own config chooses DDP (or
FSDP / DeepSpeed). This module knows the loop; data, packing and configs live in their own modules.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from toolvlm.finetune.data import ConversationDataset, load_examples
from toolvlm.finetune.packing import PackedForward, VisionFeatureCache, collate_packed, llava_of, pack_groups
from toolvlm.finetune.train_config import TrainConfig
from toolvlm.recipes import save_config

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
WEIGHTS_FILE = "trainable.safetensors"


@dataclass
class TrainResult:
    """What a run did: steps, last loss, throughput, and where the weights are."""

    steps: int
    loss: float
    tokens_per_s: float
    output: Path
    losses: list[float]


def load_model(config: TrainConfig) -> tuple[Any, str | None]:
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


def set_trainable(vlm: Any, config: TrainConfig) -> Any:
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


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (what a checkpoint stores)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def latest_checkpoint(output: Path) -> Path | None:
    """The newest complete checkpoint folder in a run's output, if any."""
    root = output / CHECKPOINTS
    found = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    return found[-1] if found else None


class Trainer:
    """One fine-tuning run from a `TrainConfig`."""

    def __init__(self, config: TrainConfig, accelerator: Any = None):
        from accelerate import Accelerator, DistributedDataParallelKwargs

        from toolvlm.vlm.config import resolve_dtype

        self.config = config
        precision = config.mixed_precision
        if precision == "auto":
            precision = "bf16" if resolve_dtype("auto") == torch.bfloat16 else "no"
        frozen = resolve_dtype(config.model.dtype)
        if precision == "no" and frozen != torch.float32:
            raise ValueError(
                f"model.dtype={config.model.dtype} keeps the frozen weights in {frozen}, which needs "
                f"mixed_precision bf16 or fp16 (this run's: {precision!r}; 'auto' is 'no' where the device has no "
                "fast bf16); use model.dtype=auto"
            )
        # rows without images leave the projector unused; DDP must not wait for its gradients then
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        self.accelerator = accelerator or Accelerator(
            mixed_precision=precision, gradient_accumulation_steps=config.grad_accum, kwargs_handlers=[ddp]
        )
        self.output = config.output
        self.step = 0
        self.losses: list[float] = []

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # -- setup --------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Load the model and the data; freeze per stage; build optimizer and schedule."""
        from transformers import get_scheduler

        cfg = self.config
        _seed_everything(cfg.seed)
        self.vlm, base = load_model(cfg)
        if cfg.stage == 2 and base is None and self.is_main:  # an adapter needs a saved base to point at
            base = str(self.output / "base")
            self.vlm.save(base)
        self.base = base or str(self.output / "base")
        self.vlm = set_trainable(self.vlm, cfg)
        self.vlm.model.train()
        self.dataset = ConversationDataset(
            self._examples(cfg.data.train, with_world=True), self.vlm, cfg.data.max_length
        )
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
            dtype=torch.bfloat16 if self.accelerator.mixed_precision == "bf16" else None,
        )
        params = [p for p in self.vlm.model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in params)
        optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.steps_per_epoch = max(
            1,
            len(self._shard(pack_groups(self.dataset.lengths, cfg.pack_tokens, cfg.seed, cfg.packing)))
            // cfg.grad_accum,
        )
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        scheduler = get_scheduler(cfg.optim.schedule, optimizer, cfg.optim.warmup_steps, self.total_steps)
        if cfg.gradient_checkpointing:
            llava_of(self.vlm.model).model.language_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.forward = PackedForward(self.vlm.model)
        # the schedule is stepped here once per optimizer step (accelerate's wrapper assumes sharded loaders)
        self.scheduler = scheduler
        self.forward, self.optimizer = self.accelerator.prepare(self.forward, optimizer)
        self.device = self.accelerator.device
        logger.info(
            "stage %d: %d examples, %d trainable parameters, %d steps (%d per epoch), %d process(es)",
            cfg.stage, len(self.dataset), self.n_trainable, self.total_steps, self.steps_per_epoch,
            self.accelerator.num_processes,
        )  # fmt: skip

    def _examples(self, sources: list[str], with_world: bool = False) -> list[Any]:
        sources = list(sources)
        if with_world and self.config.data.world is not None:
            sources.append(str(self._world_data()))
        return load_examples(sources)

    def _world_data(self) -> Path:
        from toolvlm.finetune.build_world import build_world_dataset

        folder = self.output / "data" / "world"
        path = folder / "world.jsonl"
        if self.is_main and not path.is_file():
            build_world_dataset(folder, self.config.data.world)
        self.accelerator.wait_for_everyone()
        return path

    def _shard(self, groups: list[list[int]]) -> list[list[int]]:
        """This process's rows; every process gets the same number so that DDP stays in step."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        usable = len(groups) // world * world
        return groups[:usable][rank::world]

    def _epoch_rows(self, epoch: int) -> list[list[int]]:
        cfg = self.config
        return self._shard(pack_groups(self.dataset.lengths, cfg.pack_tokens, cfg.seed + epoch, cfg.packing))

    # -- the loop -----------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Run (or resume) the training and save the result."""
        from tqdm.auto import tqdm

        cfg = self.config
        if not hasattr(self, "forward"):
            self.setup()
        if self.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output / "train_config.yaml")
        epoch, row = self._maybe_resume()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (cfg.progress and self.is_main),
                   desc=f"stage {cfg.stage}", unit="step")  # fmt: skip
        tokens, started = 0, time.perf_counter()
        window_loss, window_n = 0.0, 0
        while self.step < self.total_steps:
            rows = self._epoch_rows(epoch)
            while row < len(rows) and self.step < self.total_steps:
                batch = collate_packed([self.dataset[i] for i in rows[row]])
                row += 1
                with self.accelerator.accumulate(self.forward):
                    features = self.features.get(batch.images, batch.image_keys)
                    loss = self.forward(
                        batch.input_ids.to(self.device), batch.position_ids.to(self.device),
                        None if features is None else features.to(self.device),
                        batch.label_positions.to(self.device), batch.targets.to(self.device),
                    )  # fmt: skip
                    self.accelerator.backward(loss)
                    if self.accelerator.sync_gradients and cfg.optim.max_grad_norm:
                        self.accelerator.clip_grad_norm_(self.forward.parameters(), cfg.optim.max_grad_norm)
                    self.optimizer.step()
                    if self.accelerator.sync_gradients:
                        self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                tokens += batch.n_tokens * self.accelerator.num_processes
                window_loss += float(loss.detach())
                window_n += 1
                if not self.accelerator.sync_gradients:
                    continue
                self.step += 1
                step_loss = float(
                    self.accelerator.reduce(torch.tensor(window_loss / window_n, device=self.device), "mean")
                )
                self.losses.append(step_loss)
                window_loss, window_n = 0.0, 0
                rate = tokens / max(time.perf_counter() - started, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{rate:.0f}")
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self._log({"step": self.step, "loss": step_loss, "lr": self.scheduler.get_last_lr()[0],
                               "tokens_per_s": rate, "epoch": epoch})  # fmt: skip
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint(epoch, row)
            if row >= len(rows):
                epoch, row = epoch + 1, 0
        bar.close()
        elapsed = time.perf_counter() - started
        self.accelerator.wait_for_everyone()
        self.save_final()
        rate = tokens / max(elapsed, 1e-9)
        logger.info("trained %d steps, %.0f tokens/s, vision cache %d hits / %d misses", self.step, rate,
                    self.features.hits, self.features.misses)  # fmt: skip
        return TrainResult(
            self.step, self.losses[-1] if self.losses else float("nan"), rate, self.output, self.losses
        )

    def _log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with (self.output / "log.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        logger.info("step %(step)d loss %(loss).4f lr %(lr).2e %(tokens_per_s).0f tok/s", record)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the eval data (None without eval data)."""
        if self.eval_dataset is None:
            return None
        losses = []
        self.forward.eval()
        for i in range(len(self.eval_dataset)):
            batch = collate_packed([self.eval_dataset[i]])
            features = self.features.get(batch.images, batch.image_keys)
            with self.accelerator.autocast():
                loss = self.forward(batch.input_ids.to(self.device), batch.position_ids.to(self.device),
                                    None if features is None else features.to(self.device),
                                    batch.label_positions.to(self.device), batch.targets.to(self.device))  # fmt: skip
            losses.append(float(loss))
        self.forward.train()
        return sum(losses) / len(losses)

    # -- checkpoints --------------------------------------------------------------------------------------

    def _model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.forward).model

    def save_checkpoint(self, epoch: int, row: int) -> Path:
        """Trainable weights, optimizer, schedule, RNG and data position at the current step."""
        folder = self.output / CHECKPOINTS / f"step_{self.step:07d}"
        self.accelerator.wait_for_everyone()
        if self.is_main:
            tmp = folder.with_name(folder.name + ".tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            save_file(trainable_state(self._model()), str(tmp / WEIGHTS_FILE))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "rng": _rng_state()}, tmp / "optimizer.pt")  # fmt: skip
            state = {"step": self.step, "epoch": epoch, "row": row, "losses": self.losses}
            (tmp / STATE_FILE).write_text(json.dumps(state))
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
            for old in sorted((self.output / CHECKPOINTS).glob("step_*"))[: -self.config.keep_checkpoints]:
                shutil.rmtree(old)
            logger.info("checkpoint %s", folder)
        self.accelerator.wait_for_everyone()
        return folder

    def _maybe_resume(self) -> tuple[int, int]:
        """Load the checkpoint named by `resume` (or the latest); returns the data position (epoch, row)."""
        choice = self.config.resume
        if choice == "no":
            return 0, 0
        folder = latest_checkpoint(self.output) if choice == "auto" else Path(choice)
        if folder is None:
            return 0, 0
        if not (folder / STATE_FILE).is_file():
            raise FileNotFoundError(f"not a checkpoint (no {STATE_FILE}): {folder}")
        state = json.loads((folder / STATE_FILE).read_text())
        weights = load_file(str(folder / WEIGHTS_FILE))
        model = self._model()
        missing = set(trainable_state(model)) - set(weights)
        if missing:
            raise ValueError(
                f"checkpoint {folder} lacks trainable weights {sorted(missing)[:3]} (another recipe?)"
            )
        model.load_state_dict(weights, strict=False)
        extra = _load_training_state(folder / "optimizer.pt")
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        _set_rng_state(extra["rng"])
        self.step, self.losses = state["step"], list(state["losses"])
        logger.info("resumed from %s at step %d", folder, self.step)
        return state["epoch"], state["row"]

    def save_final(self) -> None:
        """Stage 1: the whole model; stage 2: the adapter (and the merged model with `export_merged`)."""
        if not self.is_main:
            return
        self.accelerator.unwrap_model(self.forward).restore_attention()
        self.vlm.model = self._model()
        self.vlm.model.eval()
        if self.config.stage == 1:
            self.vlm.save(self.output / "model")
        else:
            from toolvlm.vlm.lora import merge_adapter, save_adapter

            save_adapter(self.vlm, self.output / "adapter", base=self.base)
            if self.config.export_merged:
                merge_adapter(self.vlm)
                self.vlm.save(self.output / "merged")
        evaluation = self.evaluate() if self.eval_dataset is not None else None
        summary = {"steps": self.step, "loss": self.losses[-1] if self.losses else None, "eval_loss": evaluation,
                   "trainable_parameters": self.n_trainable, "processes": self.accelerator.num_processes}  # fmt: skip
        (self.output / "result.json").write_text(json.dumps(summary, indent=2) + "\n")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """The random states, as tensors and plain values only, so that a checkpoint loads with weights_only=True."""
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    numpy_state = [kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, key, pos, has_gauss, gauss = state["numpy"]
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    np.random.set_state((kind, key.astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


def _load_training_state(path: Path) -> dict[str, Any]:
    """A checkpoint's optimizer, schedule and random states, unpickled with weights_only=True: a crafted file
    cannot run code. Checkpoints written before the random states were plain hold a numpy array, whose few
    reconstruction functions are allowed too."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        numpy_types = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
        try:
            with torch.serialization.safe_globals(numpy_types):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{path} holds objects that only an unsafe unpickling could load ({err}); it was not written "
                "by toolvlm's trainer: resume from another checkpoint or start with resume=no"
            ) from None


def train(config: TrainConfig) -> TrainResult:
    """Run one fine-tuning run."""
    return Trainer(config).train()
