"""toolvlm.bundle: the default bundle's trained weights (fp16/bf16 safetensors), shipped as package data.

Each model lives in a subfolder (e.g. `detector/`, `captioner/`, `generator/`, `encoder/`, `controller/`) next to
the recipe and metrics that made it. `bundle_dir()` finds the folder; `has(name)` tells whether a part is trained.
"""

from __future__ import annotations

import os
from pathlib import Path


def bundle_dir() -> Path:
    """The bundle folder: $TOOLVLM_BUNDLE if set, else this package's folder."""
    return Path(os.environ.get("TOOLVLM_BUNDLE", Path(__file__).parent))


def part(name: str) -> Path:
    """The folder of one trained part of the bundle (it may not exist yet)."""
    return bundle_dir() / name


def has(name: str) -> bool:
    """True when the part's weights are present."""
    folder = part(name)
    return folder.is_dir() and any(folder.glob("**/*.safetensors"))
