"""Helpers shared by the Hugging Face backends: dtype names, where weights are, missing-weights messages.

Weights come from a local folder, or from a hub id that from_pretrained resolves (its cache, or the network
where there is one; never in the tests). The in-house backends take local folders only. This module imports
torch lazily so that importing a tool module stays cheap.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import sys
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from toolvlm.tools.base import MissingWeightsError

log = logging.getLogger(__name__)

EXAMPLE_BACKENDS = {
    "grounding": "owlv2",
    "counter": "owlv2",
    "captioner": "blip",
    "generator": "sd",
}


def torch_dtype(name: str) -> Any:
    """The torch dtype called `name` ('float32', 'bfloat16', 'float16')."""
    import torch

    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return dtype


# the default bundle's part holding each tool's in-house weights
BUNDLE_PARTS = {
    "grounding": "detector",
    "counter": "detector",
    "captioner": "captioner",
    "generator": "generator",
}

# a transformers model, a diffusers pipeline, the in-house generator
CHECKPOINT_FILES = ("config.json", "model_index.json", "layout.json")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def model_folder(tool: str, backend: str, model: str | Path | None, hub_ok: bool = True) -> Path | str:
    """Where a backend's weights are: a local folder, the default bundle's part (in-house, no model given), or
    (hub_ok) a hub id such as 'google/owlv2-base-patch16' for from_pretrained to resolve from its cache or the
    network. Raises MissingWeightsError saying how to configure one."""
    example = EXAMPLE_BACKENDS.get(tool, backend)
    how = (
        f"configure one with --profile PROFILE.yaml containing\n"
        f"  tools:\n    {tool}:\n      backend: {example}\n      model: /path/to/local/checkpoint\n"
        f"(or pass a model folder to build_tools({{'{tool}': {{'backend': ..., 'model': ...}}}}))"
    )
    if model is None and backend == "inhouse" and tool in BUNDLE_PARTS:
        from toolvlm import bundle

        if bundle.has(BUNDLE_PARTS[tool]):  # the default bundle's trained weights
            model = bundle.part(BUNDLE_PARTS[tool])
    if model is None:
        if backend == "inhouse":
            raise MissingWeightsError(
                f"{tool}: no weights for backend 'inhouse': the default bundle's in-house {tool} weights are "
                f"not installed yet; {how}"
            )
        raise MissingWeightsError(f"{tool}: backend {backend!r} needs 'model', a checkpoint folder; {how}")
    path = Path(model).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in CHECKPOINT_FILES):
            raise MissingWeightsError(
                f"{tool}: {str(path)!r} holds no checkpoint (none of {', '.join(CHECKPOINT_FILES)}); {how}"
            )
        return path
    if hub_ok and not path.exists() and HUB_ID.fullmatch(str(model)):
        return str(model)
    raise MissingWeightsError(f"{tool}: model folder {str(path)!r} (backend {backend!r}) not found; {how}")


@contextmanager
def loading(tool: str, backend: str, model: Any) -> Iterator[None]:
    """Turn a failure to find or read weights (OSError) into MissingWeightsError naming the tool and model;
    bitsandbytes stays unimported meanwhile (see `without_bitsandbytes`)."""
    try:
        with without_bitsandbytes():
            yield
    except MissingWeightsError:
        raise
    except OSError as err:
        raise MissingWeightsError(
            f"{tool}: cannot load {backend!r} weights from {str(model)!r}: {err}"
        ) from err


def place(model: Any, device: str, dtype: str) -> Any:
    """Move a torch module to a device and dtype, in eval mode."""
    return model.to(device=device, dtype=torch_dtype(dtype)).eval()


def unknown_backend(tool: str, backend: str, known: list[str]) -> ValueError:
    """The error for an unknown backend name, listing the known ones."""
    return ValueError(f"{tool}: unknown backend {backend!r}; known backends: {', '.join(sorted(known))}")


@contextmanager
def without_bitsandbytes() -> Iterator[None]:
    """Import libraries meanwhile as if bitsandbytes were not installed, unless it is imported already.

    diffusers and peft import bitsandbytes whenever it is installed; on a CPU its import logs a three-line
    warning and reaches for a kernel on the hub. Only QLoRA needs it (vlm.lora imports it there). Afterwards
    the availability checks of transformers and peft, which cache their answer, ask again, so QLoRA still works
    later in the same process; diffusers' own bitsandbytes quantization stays off (toolvlm does not use it).
    """
    if "bitsandbytes" in sys.modules:
        yield
        return
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # find_spec -> None, import -> ImportError
    try:
        yield
    finally:
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]
        for module, name in (
            ("transformers.utils.import_utils", "is_bitsandbytes_available"),
            ("peft.import_utils", "is_bnb_4bit_available"),
        ):
            check = getattr(sys.modules.get(module), name, None)
            if hasattr(check, "cache_clear"):
                check.cache_clear()


def is_offline() -> bool:
    """True when the Hugging Face hub is switched off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set)."""
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub answers a TCP connection within `timeout` seconds (asked once)."""
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host or "huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def in_hub_cache(repo_id: str) -> bool:
    """True when the local Hugging Face cache holds a snapshot of `repo_id` (no network)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return folder.is_dir() and any(folder.iterdir())


def resolve_model(model: Any, folder: Path) -> Any:
    """A profile's `model:` value with a relative path taken from the profile's own `folder`, not the current
    one: 'detector' or './weights/owl' -> folder/...; absolute paths, '~' paths, hub ids ('org/name', when no
    such folder is beside the profile) and non-strings stay as they are."""
    if not isinstance(model, str) or not model.strip():
        return model
    path = Path(model).expanduser()
    if path.is_absolute():
        return str(path)
    beside = Path(os.path.abspath(folder / model))  # '..' folded, symlinks kept
    if HUB_ID.fullmatch(model) and not model.startswith(".") and not beside.exists():
        return model
    return str(beside)


def model_problem(model: Any) -> str | None:
    """Why a (resolved) `model:` value cannot load, seen without loading it; None when it may load."""
    if not isinstance(model, str):
        return None
    path = Path(model)
    if path.is_absolute():
        if not path.exists():
            return f"model folder {model!r} not found"
        return None
    if HUB_ID.fullmatch(model) and not in_hub_cache(model):
        why = "HF_HUB_OFFLINE is set" if is_offline() else None if hub_reachable() else "there is no network"
        if why is not None:
            return (
                f"no folder {model!r} beside the profile, and as a hub id it is not in the local cache and the "
                f"hub cannot be reached offline ({why}); point 'model:' at a local checkpoint folder instead "
                "(a path relative to the profile's folder works)"
            )
        return None
    if HUB_ID.fullmatch(model):
        return None
    return f"model {model!r} is neither an existing folder nor a hub id ('org/name')"


def spec_problems(spec: dict[str, Any], where: str = "tools", check_models: bool = True) -> list[str]:
    """What a `tools:` spec {name: options} gets wrong, seen without loading weights: unknown tools, backends
    or options, options that are not a mapping, and (`check_models`) model folders that are missing or hub
    ids that cannot be reached (each names its key)."""
    import inspect

    from toolvlm.tools import registry

    problems = []
    known = registry.names()
    for name, options in spec.items():
        key = f"{where}.{name}"
        if name not in known:
            problems.append(f"{key}: unknown tool {name!r}; tools are: {', '.join(known)}")
            continue
        if options is None:
            continue
        if not isinstance(options, dict):
            problems.append(f"{key}: expected a mapping of options (backend, model, ...), got {options!r}")
            continue
        backends = registry.backends(name)
        chosen = options.get("backend")
        if chosen is not None and backends is not None and chosen not in backends:
            problems.append(f"{key}.backend: unknown backend {chosen!r}; backends are: {', '.join(backends)}")
        entry = registry._resolve(name)
        if isinstance(entry, type):
            try:
                inspect.signature(entry).bind(**options)
            except TypeError as err:
                taken = [p for p in inspect.signature(entry).parameters if p not in ("args", "kwargs")]
                problems.append(f"{key}: {err}; options are: {', '.join(taken)}")
        problem = model_problem(options.get("model")) if check_models else None
        if problem:
            problems.append(f"{key}.model: {problem}")
    return problems
