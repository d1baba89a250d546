"""Typed configs of the VLM core: what to assemble, and how it was assembled.

`VLMSpec` describes a LLaVA-style model built from parts; it round-trips through JSON and is saved beside the
weights as `toolvlm.json`, so a saved model is rebuilt and driven from its own config, never from its path.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

SPEC_FILE = "toolvlm.json"


@dataclass
class VisionSpec:
    """The vision encoder: a fresh CLIP/SigLIP vision transformer of this shape, or a local checkpoint."""

    kind: str = "clip"  # "clip" or "siglip" for a fresh encoder
    checkpoint: str | None = None  # a local CLIP/SigLIP (vision) model folder; overrides the shape below
    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_hidden_layers: int = 6
    num_attention_heads: int = 4


@dataclass
class VLMSpec:
    """A LLaVA-style model from parts: vision encoder + projector (+ pooling) + causal LM."""

    lm: str = "smollm2"  # a local HF folder, a hub id, a .gguf file, or "smollm2" (the default base LM)
    vision: VisionSpec = field(default_factory=VisionSpec)
    image_token_pooling: int = 1  # k: average k x k patches into one image token (k^2 fewer tokens)
    vision_feature_layer: int = -1
    image_token: str = "<image>"
    chat_format: str = "chatml"  # "chatml" (native) or "template" (the tokenizer's own chat template)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON-able data."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VLMSpec:
        """Rebuild a spec from `to_dict` output; unknown keys are an error that names them."""
        data = dict(data)
        vision = data.pop("vision", {}) or {}
        _check_keys(cls, data)
        _check_keys(VisionSpec, vision)
        return cls(vision=VisionSpec(**vision), **data)

    def save(self, folder: str | Path) -> None:
        """Write the spec as `toolvlm.json` in `folder`."""
        Path(folder, SPEC_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> VLMSpec | None:
        """The spec saved in `folder`, or None for checkpoints not made by toolvlm."""
        path = Path(folder, SPEC_FILE)
        return cls.from_dict(json.loads(path.read_text())) if path.is_file() else None


def _check_keys(cls: type, data: dict[str, Any]) -> None:
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(known)}")


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 arithmetic (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """'auto' -> bf16 where the device supports it, else fp32; names like 'float16' -> torch dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype in names:
        return names[dtype]
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32")
    return value
