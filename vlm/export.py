"""Make saved controllers load in plain transformers (and peft), with no toolvlm code.

Two kinds of folder:
- a saved pooled model (model type "toolvlm_llava", weights included): `write_remote_code` ships the model code
  (`architecture.py`, which imports no toolvlm) as `modeling_toolvlm_llava.py` and names its classes in
  config.json's `auto_map`; `VLM.save` does this for every pooled model.
- a portable adapter (LoRA + projector + vision tower, its base a `base.json` spec to build): `export_portable`
  also writes the base's config.json with `parts`, so transformers assembles the base from the language model
  (by hub id or local path) and the vision tower beside the adapter, then applies the adapter:

      AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)

This module knows file layouts and config fields; building and loading models stay in `builder.py` and `lora.py`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from . import architecture
from .architecture import MODEL_TYPE, ToolVLMConfig
from .config import VLMSpec

logger = logging.getLogger(__name__)

MODELING_FILE = "modeling_toolvlm_llava.py"
AUTO_MAP = {
    "AutoConfig": "modeling_toolvlm_llava.ToolVLMConfig",
    "AutoModelForImageTextToText": "modeling_toolvlm_llava.ToolVLMForConditionalGeneration",
}
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub copy of the default base LM (base_lm.py)


def write_remote_code(folder: str | Path) -> bool:
    """Ship the model code with a saved "toolvlm_llava" folder and name it in config.json's `auto_map`;
    False (nothing written) for other model types, which transformers loads without it."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if config.get("model_type") != MODEL_TYPE:
        return False
    shutil.copyfile(architecture.__file__, folder / MODELING_FILE)
    config["auto_map"] = dict(AUTO_MAP)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


def language_model_id(lm: str) -> str:
    """What plain transformers loads a spec's language model from: the hub id of the default SmolLM2, the
    converted folder of another GGUF file, else the spec's local folder (absolute) or hub id."""
    from .base_lm import SMOLLM2_NAMES, resolve_lm_source

    if lm in SMOLLM2_NAMES:
        return SMOLLM2_HUB_ID
    if lm.endswith(".gguf"):
        return str(Path(resolve_lm_source(lm)).resolve())
    return str(Path(lm).resolve()) if Path(lm).exists() else lm


def export_portable(folder: str | Path, dtype: str | torch.dtype = "float32") -> Path:
    """Write config.json (the base, assembled from `parts`) and the model code into a portable adapter folder
    (made by `lora.make_portable`); the base is built once here to read its config."""
    from .lora import BASE_FILE, _portable_base

    folder = Path(folder)
    spec = VLMSpec.from_dict(json.loads((folder / BASE_FILE).read_text()))
    vision = spec.vision.checkpoint
    if not vision or Path(vision).is_absolute() or not (folder / vision / "config.json").is_file():
        raise ValueError(
            f"export_portable needs the vision tower in a subfolder of {folder}; base.json names {vision!r}"
        )
    base = _portable_base(folder, dtype)
    fields = base.model.config.to_dict()
    fields.update(
        model_type=MODEL_TYPE,
        image_token_pooling=spec.image_token_pooling,
        parts={"language_model": language_model_id(spec.lm), "vision_tower": Path(vision).as_posix()},
        auto_map=dict(AUTO_MAP),
        architectures=["ToolVLMForConditionalGeneration"],
    )
    config = ToolVLMConfig.from_dict(fields)
    config.save_pretrained(folder)
    _drop_local_paths(folder / "config.json")
    shutil.copyfile(architecture.__file__, folder / MODELING_FILE)
    adapter_path = folder / "adapter_config.json"
    adapter = json.loads(adapter_path.read_text())
    adapter["base_model_name_or_path"] = config.parts["language_model"]
    adapter_path.write_text(json.dumps(adapter, indent=2) + "\n")
    logger.info("%s loads in plain transformers: base from %s + %s", folder, *config.parts.values())
    return folder


def _drop_local_paths(config_path: Path) -> None:
    """Remove the `_name_or_path` entries transformers records (paths of this machine) from a saved config."""
    config = json.loads(config_path.read_text())
    for part in (config, config.get("text_config") or {}, config.get("vision_config") or {}):
        part.pop("_name_or_path", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
