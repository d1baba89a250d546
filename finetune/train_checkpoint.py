"""The one checkpoint format of every training run: write it atomically, find it, read it back safely.

A run folder keeps its checkpoints in `checkpoints/step_NNNNNNN/`:

- `model.safetensors`: the weights the run changes (trainable parameters and buffers; a frozen base is rebuilt
  from the recipe, so a LoRA run's checkpoint holds the adapter, not the language model);
- `ema.safetensors`: the moving average of the weights, when the run keeps one;
- `training.pt`: optimizer state and the random states (python, numpy, torch), plain tensors and values only,
  read with `torch.load(weights_only=True)` so that a crafted file cannot run code;
- `state.json`: the step and the loss of every step so far.

A checkpoint is written into `step_N.tmp/` and renamed when complete, so a run killed mid-write leaves the
previous one intact; only the newest `keep` are kept. The data position is the step itself (a stage's batches are
a pure function of their index), so a resumed run sees the data an uninterrupted one would. Runs written before
this format (one `checkpoint.pt` with model, optimizer and step) are still read, for resume and export.
This module knows files and states; it knows nothing of models, stages or the loop.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
TRAINING = "training.pt"
STATE = "state.json"
LEGACY = "checkpoint.pt"  # the world-model runs' single file before this format


@dataclass
class CheckpointState:
    """What a checkpoint says about the run: its step and the loss of each step before it."""

    step: int = 0
    losses: list[float] = field(default_factory=list)


def saved_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint stores: trainable parameters and buffers, copied to the CPU (ties broken)."""
    kept = {n: p for n, p in model.named_parameters() if p.requires_grad}
    kept.update(_persistent_buffers(model))
    return {k: v.detach().cpu().clone().contiguous() for k, v in kept.items()}


def _persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The registered buffers a state dict holds (not a quantized layer's own serialized states)."""
    found = {}
    for prefix, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                found[f"{prefix}.{name}" if prefix else name] = buffer
    return found


def save_checkpoint(
    run: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    losses: list[float],
    ema: torch.nn.Module | None = None,
    keep: int = 2,
) -> Path:
    """Write the checkpoint of `step` atomically under `run/checkpoints/` and drop all but the newest `keep`."""
    root = Path(run) / CHECKPOINTS
    folder = root / f"step_{step:07d}"
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(saved_weights(model), str(tmp / WEIGHTS))
    if ema is not None:
        save_file({k: v.detach().cpu().clone() for k, v in ema.state_dict().items()}, str(tmp / EMA_WEIGHTS))
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / TRAINING)
    (tmp / STATE).write_text(json.dumps({"step": step, "losses": losses}))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    for old in sorted(p for p in root.glob("step_*") if not p.name.endswith(".tmp"))[: -max(1, keep)]:
        shutil.rmtree(old)
    log.info("checkpoint %s", folder)
    return folder


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint of a run (a legacy `checkpoint.pt` when it has no other), if any."""
    root = Path(run) / CHECKPOINTS
    found = sorted(p for p in root.glob("step_*") if (p / STATE).is_file()) if root.is_dir() else []
    if found:
        return found[-1]
    legacy = Path(run) / LEGACY
    return legacy if legacy.is_file() else None


def checkpoint_to_resume(run: Path, resume: str) -> Path | None:
    """The checkpoint a run starts from: `auto` the latest in its folder, `no` none, else the folder named."""
    if resume == "no":
        return None
    if resume == "auto":
        return latest_checkpoint(run)
    folder = Path(resume)
    if not ((folder / STATE).is_file() or (folder.is_file() and folder.name == LEGACY)):
        raise FileNotFoundError(f"resume={resume}: not a checkpoint folder (no {STATE} in it)")
    return folder


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    ema: torch.nn.Module | None = None,
) -> CheckpointState:
    """Load a checkpoint into a model (and optimizer, EMA and random states when given); returns its state."""
    path = Path(path)
    if path.is_file():
        return _load_legacy(path, model, optimizer, ema)
    weights = load_file(str(path / WEIGHTS))
    expected = saved_weights(model)
    missing = sorted(set(expected) - set(weights))
    known = {n for n, _ in model.named_parameters()} | set(_persistent_buffers(model))
    unexpected = sorted(set(weights) - known)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit this model (another recipe?): missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    model.load_state_dict(weights, strict=False)
    if ema is not None:
        if not (path / EMA_WEIGHTS).is_file():
            raise ValueError(f"{path} has no EMA weights but the recipe sets ema_decay")
        ema.load_state_dict(load_file(str(path / EMA_WEIGHTS)))
    if optimizer is not None:
        training = load_training_state(path / TRAINING)
        optimizer.load_state_dict(training["optimizer"])
        set_rng_state(training["rng"])
    state = json.loads((path / STATE).read_text())
    return CheckpointState(int(state["step"]), [float(x) for x in state["losses"]])


def load_checkpoint_into(model: torch.nn.Module, run: Path) -> int:
    """Load a run's latest weights (its EMA when it kept one) into a model; returns the step (0: none)."""
    path = latest_checkpoint(run)
    if path is None:
        return 0
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        averaged = state.get("ema")
        model.load_state_dict(state["model"] if averaged is None else _ema_module(averaged))
        return int(state["step"])
    if (path / EMA_WEIGHTS).is_file():
        model.load_state_dict(_ema_module(load_file(str(path / EMA_WEIGHTS))), strict=False)
    else:
        model.load_state_dict(load_file(str(path / WEIGHTS)), strict=False)
    return int(json.loads((path / STATE).read_text())["step"])


def _ema_module(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The averaged model's own weights from an `AveragedModel` state (keys `module.*`)."""
    prefix = "module."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _load_legacy(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, ema: torch.nn.Module | None
) -> CheckpointState:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if ema is not None:
        if "ema" not in state:
            raise ValueError(f"{path} has no EMA weights but the recipe sets ema_decay")
        ema.load_state_dict(state["ema"])
    return CheckpointState(int(state["step"]), [])


def rng_state() -> dict[str, Any]:
    """The random states, as tensors and plain values only, so that a checkpoint loads with weights_only=True."""
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    numpy_state = [kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the random states written by `rng_state`."""
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, key, pos, has_gauss, gauss = state["numpy"]
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    np.random.set_state((kind, key.astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's random generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_training_state(path: Path) -> dict[str, Any]:
    """A checkpoint's optimizer and random states, unpickled with weights_only=True: a crafted file cannot run
    code. Files whose random states hold a numpy array (older controller checkpoints) load too, with only
    numpy's few reconstruction functions allowed."""
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
                "by toolvlm's training loop: resume from another checkpoint or start with resume=no"
            ) from None
