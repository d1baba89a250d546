"""toolvlm.bundle: the default bundle's trained weights (fp16/bf16 safetensors), shipped as package data.

Each model lives in a subfolder named in `PARTS` next to the recipe that made it; the bundle's profile, the
out-of-domain statistics and `metrics_*.json` lie beside them. The names are defined here once. `bundle_dir()`
finds the folder; `has(name)` tells whether a part is trained.
"""

from __future__ import annotations

import os
from pathlib import Path

WORLD_PARTS: tuple[str, ...] = ("encoder", "detector", "captioner", "generator")  # trained on the world alone
CONTROLLER = "controller"
PARTS: tuple[str, ...] = (*WORLD_PARTS, CONTROLLER)
TOOL_PARTS: dict[str, str] = {"grounding": "detector", "captioner": "captioner", "generator": "generator"}
PROFILE = "profile.yaml"  # the default profile; its relative model paths are parts of the bundle
DOMAIN_STATS = "domain.safetensors"  # the out-of-domain check's statistics (toolvlm.tools.domain)


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
