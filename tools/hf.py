"""Helpers shared by the Hugging Face backends: dtype names, where weights are, missing-weights messages.

Weights come from a local folder, or from a hub id that from_pretrained resolves (its cache, or the network
where there is one; never in the tests). The in-house backends take local folders only. This module imports
torch lazily so that importing a tool module stays cheap.
"""

from __future__ import annotations

import logging
import re
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
    """Turn a failure to find or read weights (OSError) into MissingWeightsError naming the tool and model."""
    try:
        yield
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
