"""The one training loop of every stage (the controller and the world models): schedule, precision, devices,
gradient accumulation, processes, checkpoints, resume, logging and export.

A stage is an object with
- `model`: the torch module to optimise;
- `batch(index)`: the batch of micro-batch `index` (step * grad_accum + k), a pure function of the index so that
  a resumed run sees the same data, and so that worker processes can build batches;
- `loss(batch) -> (loss, {name: float})`: the loss to minimise and figures to log;
- `export(folder) -> dict | None`: write the trained model in the format its users load, into
  `RUN/<export_subdir>` (`export/` unless the stage names another; "" is the run folder itself), optionally
  returning figures for `result.json`;
and optionally `total_steps()` (the steps of a run whose `steps` is 0, e.g. a number of epochs) and
`distributed = True` (its `loss` calls `self.model`, which the loop replaces by accelerate's DDP wrapper while
several processes train; stages without it train in one process).

`train(stage, config)` writes into `run_dir`: `recipe.yaml` (the resolved config), `log.jsonl` (one JSON line per
`log_every` steps: step, lr, loss and the stage's figures averaged over those steps, seconds per step, tokens/s
where batches count tokens), checkpoints in the format of `train_checkpoint` (every `save_every` steps and at the
end), the stage's export and `result.json`. A run whose folder holds a checkpoint resumes from it (`resume`).

Processes and devices come from accelerate (`accelerate launch` starts several; DDP across them), precision
is bf16 autocast or fp32, the schedule a linear warm-up then cosine (or linear, or constant) decay to
`min_lr_ratio * lr`. With `ema_decay` > 0 the loop keeps an exponential moving average of the weights (torch's
`AveragedModel`, buffers included, decay warmed up as min(decay, (1 + n) / (10 + n)) after n updates, as in
diffusers' EMAModel), checkpoints it and exports it instead of the last weights. This module knows nothing of
what a stage trains.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from toolvlm.finetune.train_checkpoint import (
    checkpoint_to_resume,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)
from toolvlm.recipes import save_config

log = logging.getLogger(__name__)

EXPORT = "export"
LOG = "log.jsonl"
RECIPE = "recipe.yaml"
RESULT = "result.json"
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    """The options of the training loop, shared by every stage; each stage subclasses it with its own."""

    run_dir: str = "runs/stage"
    steps: int = 1000  # optimizer steps (a stage that counts epochs takes 0 to mean its `epochs`)
    grad_accum: int = 1  # micro-batches per optimizer step (per process)
    lr: float = 3e-4
    weight_decay: float = 0.05  # AdamW's, on matrices only (not on biases, norms, embeddings)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 100  # linear warm-up from lr / warmup_steps
    schedule: str = "cosine"  # then cosine, linear or constant, down to min_lr_ratio * lr at the last step
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max gradient norm (0: no clipping)
    bf16: bool | str = (
        "auto"  # bf16 autocast; "auto": on GPUs with bf16 and CPUs with native bf16 (AVX512-BF16)
    )
    device: str = "cpu"  # "cpu", "cuda" or "auto" (cuda where available)
    threads: int = 0  # torch CPU threads (0: torch's default)
    workers: int = 0  # processes building batches (0: in the training process)
    seed: int = 0
    save_every: int = 100  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: str = "auto"  # auto: the latest checkpoint in run_dir; "no"; or a checkpoint folder
    export_at_end: bool = True
    ema_decay: float = 0.0  # > 0: keep an EMA of the weights and export it (0: export the last weights)
    progress: bool = True  # a progress bar

    def __post_init__(self) -> None:
        if self.resume is False:  # YAML reads a bare `no` as false
            self.resume = "no"
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers (Adam's beta1, beta2), got {self.betas!r}")

    @property
    def run(self) -> Path:
        """The run folder as a path."""
        return Path(self.run_dir)


class Stage(Protocol):
    """What the loop needs from a stage."""

    model: torch.nn.Module

    def batch(self, index: int) -> Any:
        """The batch of a micro-batch index (deterministic in the index)."""

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to minimise and figures to log."""

    def export(self, folder: Path) -> dict[str, Any] | None:
        """Write the trained model in the format its users load."""


@dataclass
class TrainResult:
    """What a run did: steps, last loss, the loss of every step, throughput and where it is."""

    steps: int
    loss: float
    losses: list[float]
    tokens_per_s: float
    run: Path


def lr_at(step: int, config: TrainConfig, total: int | None = None) -> float:
    """Linear warm-up, then the schedule's decay to min_lr_ratio * lr at the last of `total` steps."""
    total = config.steps if total is None else total
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    shape = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * shape[config.schedule])


def optimizer_for(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable weights; no weight decay on biases, norms, embeddings and scalars."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim < 2 or "embed" in name or "norm" in name
        (no_decay if flat else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the stage's model has no trainable weights")
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)


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


def process_state(config: TrainConfig) -> Any:
    """accelerate's process state (rank, number of processes, device) for a run's device setting."""
    from accelerate import PartialState

    return PartialState(cpu=train_device(config.device).type == "cpu")


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


class _IndexedBatches(torch.utils.data.Dataset):
    """The batches of micro-batch indices start..stop-1, for a DataLoader whose workers build them."""

    def __init__(self, stage: Stage, start: int, stop: int) -> None:
        self.stage, self.start, self.stop = stage, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> Any:
        return self.stage.batch(self.start + i)


def _first(batch: Any) -> Any:
    return batch


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def indexed_batches(stage: Stage, start: int, stop: int, workers: int):
    """An iterator over the batches of micro-batches start..stop-1, built in-process or by `workers` processes."""
    if workers <= 0:
        return (stage.batch(i) for i in range(start, stop))
    loader = torch.utils.data.DataLoader(
        _IndexedBatches(stage, start, stop),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        prefetch_factor=4,
        collate_fn=_first,
        worker_init_fn=_one_thread,
    )
    return iter(loader)


def total_steps(stage: Stage, config: TrainConfig) -> int:
    """The run's optimizer steps: `steps`, or the stage's own count (epochs) when `steps` is 0."""
    if config.steps > 0:
        return config.steps
    counted = getattr(stage, "total_steps", None)
    if counted is None:
        raise ValueError(f"steps must be > 0, got {config.steps}")
    return max(1, int(counted()))


def train(stage: Stage, config: TrainConfig) -> TrainResult:
    """Run (or resume) a stage to its last step, then export it; returns what the run did."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from tqdm.auto import tqdm

    device = train_device(config.device)
    # rows without images leave a projector unused; DDP must not wait for its gradients then
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no", kwargs_handlers=[ddp])
    processes, main = accelerator.num_processes, accelerator.is_main_process
    if processes > 1 and not getattr(stage, "distributed", False):
        raise ValueError(f"{type(stage).__name__} trains in one process; launch it without accelerate")
    device = accelerator.device
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    run = config.run
    if main:
        run.mkdir(parents=True, exist_ok=True)
        save_config(config, run / RECIPE)
    model = stage.model.to(device)
    optimizer = optimizer_for(model, config)
    ema = make_ema(model, config.ema_decay) if config.ema_decay > 0 else None
    total = total_steps(stage, config)
    start, losses = 0, []
    resume = checkpoint_to_resume(run, config.resume)
    if resume is not None:
        state = load_checkpoint(resume, model, optimizer, ema)
        start, losses = state.step, state.losses
        log.info("resumed %s at step %d", resume, start)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("training %s: %d trainable parameters, steps %d -> %d, %d process(es)", run, n_trainable, start,
             total, processes)  # fmt: skip
    module = accelerator.prepare_model(model) if processes > 1 else model
    stage.model = module
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16(config.bf16, device) else nullcontext()
    )
    micro = config.grad_accum
    batches = indexed_batches(stage, start * micro, total * micro, config.workers)
    model.train()
    window: dict[str, float] = {}
    window_steps, tokens, t0 = 0, 0, time.perf_counter()
    bar = tqdm(total=total, initial=start, desc=run.name, unit="step", mininterval=10,
               disable=not (config.progress and main))  # fmt: skip
    for step in range(start, total):
        lr = lr_at(step, config, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_figures: dict[str, float] = {}
        for k in range(micro):
            batch = to_device(next(batches), device)
            tokens += int(getattr(batch, "n_tokens", 0)) * processes
            with accelerator.no_sync(module) if k < micro - 1 else nullcontext():
                with autocast:
                    loss, figures = stage.loss(batch)
                (loss / micro).backward()
            for name, value in {"loss": float(loss.detach()), **figures}.items():
                step_figures[name] = step_figures.get(name, 0.0) + value / micro
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update_parameters(model)
        if processes > 1:
            step_figures["loss"] = float(
                accelerator.reduce(torch.tensor(step_figures["loss"], device=device), "mean")
            )
        losses.append(step_figures["loss"])
        for name, value in step_figures.items():
            window[name] = window.get(name, 0.0) + value
        window_steps += 1
        done = step + 1
        bar.update(1)
        bar.set_postfix({"loss": f"{step_figures['loss']:.4g}"}, refresh=False)
        if done % config.log_every == 0 or done == total:
            elapsed = time.perf_counter() - t0
            record = {"step": done, "lr": lr, "s_per_step": round(elapsed / (done - start), 4)}
            record.update({k: round(v / window_steps, 6) for k, v in window.items()})
            if tokens:
                record["tokens_per_s"] = round(tokens / max(elapsed, 1e-9), 1)
            if main:
                with (run / LOG).open("a") as f:
                    f.write(json.dumps(record) + "\n")
            log.info("step %d %s", done, " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step"))
            window, window_steps = {}, 0
        if (config.save_every and done % config.save_every == 0) or done == total:
            accelerator.wait_for_everyone()
            if main:
                save_checkpoint(run, done, model, optimizer, losses, ema, config.keep_checkpoints)
            accelerator.wait_for_everyone()
    bar.close()
    elapsed = time.perf_counter() - t0
    stage.model = model
    if ema is not None:  # the average is what gets exported (the checkpoints keep both)
        model.load_state_dict(ema.module.state_dict())
    stage.model.to("cpu")
    rate = tokens / max(elapsed, 1e-9)
    result = TrainResult(total, losses[-1] if losses else float("nan"), losses, rate, run)
    if main and config.export_at_end:
        figures = export(stage, run)
        summary = {"steps": total, "loss": result.loss, "trainable_parameters": n_trainable,
                   "processes": processes, "seconds": round(elapsed, 1), **(figures or {})}  # fmt: skip
        (run / RESULT).write_text(json.dumps(summary, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return result


def export(stage: Stage, run: Path) -> dict[str, Any] | None:
    """Write the stage's export into the run (with the run's recipe beside it); returns the stage's figures."""
    folder = run / getattr(stage, "export_subdir", EXPORT)
    stage.model.eval()
    figures = stage.export(folder)
    if folder != run and (run / RECIPE).is_file():
        (folder / RECIPE).write_text((run / RECIPE).read_text())
    log.info("exported %s", folder)
    return figures
