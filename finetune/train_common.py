"""The training loop shared by the world-model stages: optimiser, schedule, bf16 autocast, checkpoints, resume.

A stage (train_encoder, train_detector, train_captioner, train_generator) is an object with `model` (the
torch module to optimise), `batch(step)` (the batch of a step, a pure function of the step so that a resumed
run sees the same data), `loss(batch) -> (loss, {name: float})` and `export(folder)` (fp16 weights in the
format its tools backend loads). This module knows nothing of what a stage trains.

A run folder holds `recipe.yaml` (the resolved config), `checkpoint.pt` (model, optimiser, step; written
atomically every `save_every` steps and at the end), `log.jsonl` (one line per `log_every` steps) and, at the
end, `export/`. Starting a run whose folder has a checkpoint resumes from it.

With `ema_decay` > 0 the loop also keeps an exponential moving average of the weights (torch's
`AveragedModel`, buffers included, decay warmed up as min(decay, (1 + n) / (10 + n)) after n updates, as in
diffusers' EMAModel), checkpoints it with the rest and exports it instead of the last weights: diffusion models
sample markedly cleaner from the average (DDPM, Ho et al. 2020, used 0.9999).

`device` picks where the model trains ("cuda" where a stage builds its loss tensors on the model's device, as
the detector does); `workers` > 0 builds the batches in that many processes (a torch DataLoader over step
numbers; `batch(step)` is a pure function of the step, so the data are the same as in-process).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from toolvlm.recipes import save_config

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
EXPORT = "export"


@dataclass
class TrainConfig:
    """Options every stage shares; stages subclass it with their model and data options."""

    run_dir: str = "runs/stage"
    steps: int = 1000
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    bf16: bool | str = "auto"  # bf16 autocast; "auto": where the CPU has native bf16 (else it is far slower)
    threads: int = 2
    seed: int = 0
    save_every: int = 100
    log_every: int = 10
    export_at_end: bool = True
    ema_decay: float = 0.0  # > 0: keep an EMA of the weights and export it (0: export the last weights)
    device: str = "cpu"  # "cpu", "cuda" or "auto" (cuda where available)
    workers: int = 0  # processes building batches (0: in the training process)


class Stage(Protocol):
    """What the loop needs from a stage."""

    model: torch.nn.Module

    def batch(self, step: int) -> Any:
        """The batch of a training step (deterministic in the step)."""

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to minimise and figures to log."""

    def export(self, folder: Path) -> None:
        """Write the trained model in its tools-backend format."""


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_for(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, embeddings and scalars."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim < 2 or "embed" in name or "norm" in name
        (no_decay if flat else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    ema: torch.nn.Module | None = None,
) -> None:
    """Write model + optimiser + step (+ the EMA) atomically (a temp file renamed over the old one)."""
    tmp = path.with_suffix(".tmp")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
    if ema is not None:
        state["ema"] = ema.state_dict()
    torch.save(state, tmp)
    os.replace(tmp, path)


def make_ema(model: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of a model's weights and buffers, its decay warmed up with the updates."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {decay}")

    def average(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1.0 + float(num_averaged)) / (10.0 + float(num_averaged)))
        return averaged + (current - averaged) * (1.0 - d)

    return torch.optim.swa_utils.AveragedModel(model, avg_fn=average, use_buffers=True)


def use_bf16(setting: bool | str, device: torch.device | None = None) -> bool:
    """Whether to train under bf16 autocast: True / False, or "auto" for GPUs and for CPUs with native bf16
    arithmetic (AVX512-BF16 or AMX; elsewhere bf16 is emulated and several times slower than fp32)."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"bf16 must be true, false or auto, got {setting!r}")
    if device is not None and device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    from toolvlm.vlm.config import cpu_supports_bf16

    return cpu_supports_bf16()


def train_device(setting: str) -> torch.device:
    """The device a run trains on; asking for cuda where there is none raises."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {setting!r}")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but torch sees no CUDA device")
    return torch.device(setting)


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch with its tensors (in dicts, lists, tuples and tokenizer outputs) on `device`; the rest as is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    if hasattr(batch, "to") and hasattr(batch, "data"):  # transformers' BatchEncoding
        return batch.to(device)
    return batch


class _StepBatches(torch.utils.data.Dataset):
    """The batches of steps start..steps-1, for a DataLoader whose workers build them."""

    def __init__(self, stage: Stage, start: int, steps: int) -> None:
        self.stage, self.start, self.steps = stage, start, steps

    def __len__(self) -> int:
        return self.steps - self.start

    def __getitem__(self, i: int) -> Any:
        return self.stage.batch(self.start + i)


def step_batches(stage: Stage, start: int, config: TrainConfig):
    """An iterator over the batches of the remaining steps, built in-process or by `config.workers` processes."""
    if config.workers <= 0:
        return (stage.batch(step) for step in range(start, config.steps))
    loader = torch.utils.data.DataLoader(
        _StepBatches(stage, start, config.steps),
        batch_size=None,
        shuffle=False,
        num_workers=config.workers,
        prefetch_factor=4,
        collate_fn=lambda batch: batch,
        worker_init_fn=lambda _: torch.set_num_threads(1),
    )
    return iter(loader)


def train(stage: Stage, config: TrainConfig) -> Path:
    """Run (or resume) a stage to config.steps; returns the run folder."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    run = Path(config.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    save_config(config, run / "recipe.yaml")
    device = train_device(config.device)
    model = stage.model.to(device)
    optimizer = optimizer_for(model, config)
    ema = make_ema(model, config.ema_decay) if config.ema_decay > 0 else None
    start = 0
    checkpoint = run / CHECKPOINT
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            if "ema" not in state:
                raise ValueError(f"{checkpoint} has no EMA weights but the recipe sets ema_decay")
            ema.load_state_dict(state["ema"])
        start = int(state["step"])
        log.info("resumed %s at step %d", run, start)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("training %s: %.2fM parameters, steps %d -> %d", run, n_params / 1e6, start, config.steps)
    bf16 = use_bf16(config.bf16, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    batches = step_batches(stage, start, config)
    model.train()
    smooth: dict[str, float] = {}
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=run.name, mininterval=10)
    t0 = time.time()
    with (run / "log.jsonl").open("a") as log_file:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            batch = to_device(next(batches), device)
            with autocast:
                loss, figures = stage.loss(batch)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(model)
            figures = {"loss": float(loss.detach()), **figures}
            for k, v in figures.items():
                smooth[k] = v if k not in smooth else 0.95 * smooth[k] + 0.05 * v
            bar.set_postfix({k: f"{v:.3g}" for k, v in smooth.items()}, refresh=False)
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                elapsed = time.time() - t0
                record = {"step": done, "lr": lr_at(step, config), "s_per_step": elapsed / (done - start)}
                record.update({k: round(v, 5) for k, v in smooth.items()})
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                log.info(
                    "step %d %s", done, " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step")
                )
            if done % config.save_every == 0 or done == config.steps:
                save_checkpoint(checkpoint, model, optimizer, done, ema)
    if ema is not None:  # the average is what gets exported (the checkpoint keeps both)
        model.load_state_dict(ema.module.state_dict())
    stage.model.to("cpu")
    if config.export_at_end:
        export(stage, run)
    return run


def export(stage: Stage, run: Path) -> Path:
    """Write the stage's export folder (weights in fp16 plus the recipe) under the run."""
    folder = run / EXPORT
    stage.model.eval()
    stage.export(folder)
    if (run / "recipe.yaml").is_file():
        (folder / "recipe.yaml").write_text((run / "recipe.yaml").read_text())
    log.info("exported %s", folder)
    return folder


def load_checkpoint_into(model: torch.nn.Module, run: Path) -> int:
    """Load a run's checkpoint weights (its EMA when it kept one) into a model; returns the step (0: none)."""
    checkpoint = Path(run) / CHECKPOINT
    if not checkpoint.is_file():
        return 0
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if "ema" in state:
        prefix = "module."
        model.load_state_dict({k[len(prefix) :]: v for k, v in state["ema"].items() if k.startswith(prefix)})
    else:
        model.load_state_dict(state["model"])
    return int(state["step"])


def vit_shape(c: Any) -> dict[str, int]:
    """Vision-transformer config kwargs from a recipe's vision_width/layers/heads, image_size and patch_size."""
    return dict(
        hidden_size=c.vision_width,
        intermediate_size=4 * c.vision_width,
        num_hidden_layers=c.vision_layers,
        num_attention_heads=c.vision_heads,
        image_size=c.image_size,
        patch_size=c.patch_size,
    )


def resize_vision(model: Any, image_size: int) -> Any:
    """The model rebuilt for square inputs of `image_size` pixels, its vision tower's patch-grid position
    embeddings interpolated bicubically (as ViT, CLIP and OWL-ViT fine-tune at a higher resolution); everything
    the config derives from the grid (OWL-ViT's box priors) is rebuilt with it. The same model when the size is
    its own; a size that is not a multiple of the patch size raises."""
    vision = model.config.vision_config
    if image_size == vision.image_size:
        return model
    if image_size % vision.patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {vision.patch_size}")
    name, embeddings = next((n, m) for n, m in model.named_modules() if n.endswith("vision_model.embeddings"))
    state = model.state_dict()
    key = next(k for k in state if k.startswith(f"{name}.position_embedding"))
    with torch.no_grad():
        probe = torch.zeros((1, 1 + (image_size // vision.patch_size) ** 2, vision.hidden_size))
        position = embeddings.interpolate_pos_encoding(probe, image_size, image_size)
    state[key] = position[0] if state[key].dim() == 2 else position  # an Embedding's weight or a Parameter
    resized = rebuilt(model, image_size=image_size)
    resized.load_state_dict(state)
    log.info(
        "%s resized from %d to %d px (%d patches)",
        model.__class__.__name__,
        vision.image_size,
        image_size,
        position.shape[1] - 1,
    )
    return resized


def vision_tower(model: Any) -> Any:
    """The vision transformer of a CLIP/OWL-ViT-style model (its `vision_model`)."""
    return next(m for n, m in model.named_modules() if n.endswith("vision_model"))


def rebuilt(model: Any, **vision: Any) -> Any:
    """A new model of the same class and dtype whose vision config takes `vision`'s values (weights not loaded)."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    for name, value in vision.items():
        setattr(config.vision_config, name, value)
    return model.__class__(config).to(next(model.parameters()).dtype)


def deepen_vision(model: Any, extra: int) -> Any:
    """The model rebuilt with `extra` more layers on top of its vision tower, each starting as the identity (the
    residual branches' output projections zero, as ReZero and zero-init residual blocks start), so that the
    rebuilt model computes what the model did and training grows the new layers from there."""
    if extra <= 0:
        return model
    old = model.config.vision_config.num_hidden_layers
    deeper = rebuilt(model, num_hidden_layers=old + extra)
    missing, unexpected = deeper.load_state_dict(model.state_dict(), strict=False)
    new_layers = tuple(f"vision_model.encoder.layers.{i}." for i in range(old, old + extra))
    strange = [k for k in missing if not any(n in k for n in new_layers)]
    if strange or unexpected:
        raise ValueError(f"deepening failed: missing {strange[:4]}, unexpected {unexpected[:4]}")
    with torch.no_grad():
        for layer in vision_tower(deeper).encoder.layers[old:]:
            for residual_out in (layer.self_attn.out_proj, layer.mlp.fc2):
                residual_out.weight.zero_()
                residual_out.bias.zero_()
    log.info("%s vision tower deepened from %d to %d layers", model.__class__.__name__, old, old + extra)
    return deeper


def freeze_vision(model: Any, layers: int) -> None:
    """Freeze the vision tower's patch and position embeddings, its pre-norm and its first `layers` layers."""
    if layers <= 0:
        return
    vision = vision_tower(model)
    frozen = [vision.embeddings, *[m for n, m in vision.named_children() if n.startswith("pre_lay")]]
    frozen += list(vision.encoder.layers[:layers])
    for module in frozen:
        module.requires_grad_(False)


def load_trained(model_class: Any, folder: str, config: Any = None) -> tuple[Any, Any]:
    """A stage's exported model (in float32, to train on) and its tokenizer, from its export folder. With the
    run's `config`, the model is resized to the config's image_size (`resize_vision`) when it saw another, and
    the config's size fields take the loaded model's sizes (the run's recipe.yaml then tells what was trained,
    not the defaults)."""
    from transformers import AutoTokenizer

    model = model_class.from_pretrained(folder, use_safetensors=True).float()
    if config is not None:
        if config.image_size:
            model = resize_vision(model, config.image_size)
        v, t = model.config.vision_config, model.config.text_config
        sizes = {
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "vision_width": v.hidden_size,
            "vision_layers": v.num_hidden_layers,
            "vision_heads": v.num_attention_heads,
            "text_width": t.hidden_size,
            "text_layers": t.num_hidden_layers,
            "text_heads": t.num_attention_heads,
            "max_length": t.max_position_embeddings,
            "projection_dim": getattr(model.config, "projection_dim", None),
        }
        for name, value in sizes.items():
            if hasattr(config, name) and value is not None:
                setattr(config, name, value)
    return model, AutoTokenizer.from_pretrained(folder)


def fp16_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float16 copy of a module for saving (the trained one stays float32)."""
    import copy

    return copy.deepcopy(module).to(torch.float16)
