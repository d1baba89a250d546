"""LoRA and QLoRA for the controller, with peft and bitsandbytes.

LoRA adapters go on the language model's linear layers (target modules configurable); the projector is fully
trainable (saved with the adapter); the vision tower is frozen unless asked otherwise. QLoRA loads the saved
base model with its LM in 4-bit NF4 (bitsandbytes; this runs on CPU too) and trains LoRA adapters on top.
Adapters save separately (with the processor and a pointer to their base) and merge into the base for export.

peft imports bitsandbytes whenever it is installed, and on a CPU that import warns and reaches for the hub; so
outside QLoRA (which imports it on purpose, through transformers' quantization) every function here that uses
peft runs under `without_bitsandbytes()`, and a generate turn or a plain LoRA run never imports it.

This module knows peft and quantization; not chats, data or training loops.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from toolvlm.tools.hf import without_bitsandbytes

from .config import VLMSpec, resolve_dtype

logger = logging.getLogger(__name__)

LM_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPEC_FILE = "toolvlm_lora.json"
BASE_FILE = "base.json"  # a portable adapter's base: a VLMSpec to build (see make_portable)


@dataclass
class LoRASpec:
    """Which weights train: LoRA on named LM linears, the projector in full, the vision tower optionally."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LM_LINEARS))
    train_projector: bool = True
    train_vision: bool = False
    qlora: bool = False  # 4-bit NF4 base LM (bitsandbytes)

    def target_regex(self) -> str:
        """A peft target regex matching the named linears inside the language model only."""
        names = "|".join(sorted(set(self.target_modules)))
        return rf".*language_model.*\.({names})$"


def quantized_load(folder: str | Path, compute_dtype: str | torch.dtype = "auto"):
    """Load a saved LLaVA-family model with its language model in 4-bit NF4 (vision and projector unquantized)."""
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    dtype = resolve_dtype(compute_dtype)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=[
            "model.vision_tower",
            "model.multi_modal_projector",
            "lm_head",
        ],  # from the start
    )
    return AutoModelForImageTextToText.from_pretrained(folder, quantization_config=config, dtype=dtype)


@without_bitsandbytes()
def apply_lora(vlm, spec: LoRASpec | None = None):
    """Wrap `vlm.model` with LoRA adapters per `spec` (in place) and return the VLM; reports trainable counts."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    spec = spec or LoRASpec()
    model = vlm.model
    if spec.qlora and not getattr(model, "is_loaded_in_4bit", False):
        raise ValueError("qlora=True needs a 4-bit base: load it with quantized_load(folder) first")
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_regex(),
        modules_to_save=["multi_modal_projector"] if spec.train_projector else None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    for name, param in model.named_parameters():
        if "vision_tower" in name:
            param.requires_grad = spec.train_vision
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    vlm.model = model
    vlm.engine.model = model
    vlm.engine.reset()
    vlm.lora_spec = spec
    return vlm


@without_bitsandbytes()
def save_adapter(vlm, folder: str | Path, base: str | Path | None = None) -> Path:
    """Save only the adapter (and trained projector) plus the processor; `base` is the saved base model folder."""
    from peft import PeftModel

    if not isinstance(vlm.model, PeftModel):
        raise ValueError("this VLM has no LoRA adapter to save; call apply_lora first")
    base = base or vlm.model.peft_config["default"].base_model_name_or_path or getattr(vlm, "source", None)
    if not base or not Path(base, "config.json").is_file():
        raise ValueError(f"save_adapter needs the saved base model folder, got {base!r}; save the base first")
    folder = Path(folder)
    vlm.model.peft_config["default"].base_model_name_or_path = str(Path(base).resolve())
    vlm.model.save_pretrained(folder)
    vlm.processor.save_pretrained(folder)
    spec = getattr(vlm, "lora_spec", None)
    Path(folder, SPEC_FILE).write_text(json.dumps(asdict(spec) if spec else {}, indent=2) + "\n")
    return folder


def make_portable(folder: str | Path, base_spec: VLMSpec) -> Path:
    """Make a saved adapter self-contained: its base becomes `base_spec`, a model to build (`base.json`)
    rather than a saved folder; a relative vision checkpoint in the spec is taken from the adapter folder.
    `base_model_name_or_path` names the base's language model (`export.language_model_id`); `export.
    export_portable` then makes the folder load in plain transformers.

    The base's frozen weights are then whatever the spec names (the SmolLM2 package, a vision folder), so the
    adapter folder holds only what training changed: LoRA matrices and the projector (a few MB, not the
    hundreds of a merged model)."""
    folder = Path(folder)
    Path(folder, BASE_FILE).write_text(json.dumps(base_spec.to_dict(), indent=2) + "\n")
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    from .export import language_model_id

    config["base_model_name_or_path"] = language_model_id(base_spec.lm)  # peft's record of the base LM
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _portable_base(folder: Path, dtype: str | torch.dtype, vision: str | Path | None = None):
    """Build the base of a portable adapter from its `base.json` (with `vision` as its tower, if given)."""
    from .builder import build_vlm

    spec = VLMSpec.from_dict(json.loads((folder / BASE_FILE).read_text()))
    if vision is not None:
        spec.vision.checkpoint = str(Path(vision).resolve())
    checkpoint = spec.vision.checkpoint
    if checkpoint and not Path(checkpoint).is_absolute():
        spec.vision.checkpoint = str((folder / checkpoint).resolve())
        if not Path(spec.vision.checkpoint, "config.json").is_file():
            raise FileNotFoundError(
                f"the adapter in {folder} needs its vision encoder at {spec.vision.checkpoint}"
            )
    return build_vlm(spec, dtype=dtype)


# adapter_config.json settings under which an adapter is plain LoRA (W + alpha/r B A, whole modules saved)
_PLAIN_LORA = {
    "peft_type": "LORA", "use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "bias": "none",
    "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None, "target_parameters": None,
    "trainable_token_indices": None, "use_qalora": False,
}  # fmt: skip
_SAVED_PREFIX = "base_model.model."


def fold_lora(model: torch.nn.Module, folder: str | Path) -> bool:
    """Fold a plain LoRA adapter into `model`'s weights in place, without peft; False (model untouched) if the
    adapter is not plain LoRA.

    Inference needs no peft: W' = W + (alpha / r) B A for every adapted linear (alpha / sqrt(r) with rsLoRA),
    and the fully trained modules (the projector) replace the base's. Importing peft costs seconds (it pulls in
    bitsandbytes and torch.compile), a third of the default assistant's load time."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights_file = folder / "adapter_model.safetensors"
    config = json.loads(Path(folder, "adapter_config.json").read_text())
    if not weights_file.is_file() or any(config.get(k, v) != v for k, v in _PLAIN_LORA.items()):
        return False
    rank, alpha = config["r"], config["lora_alpha"]
    scale = alpha / (rank**0.5 if config.get("use_rslora") else rank)
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(weights_file).items():
        name = key.removeprefix(_SAVED_PREFIX)
        for part in ("A", "B"):
            if name.endswith(f".lora_{part}.weight"):
                pairs.setdefault(name.removesuffix(f".lora_{part}.weight"), {})[part] = tensor
                break
        else:
            whole[name] = tensor
    plain = all(
        set(pair) == {"A", "B"} and isinstance(modules.get(name), torch.nn.Linear)
        for name, pair in pairs.items()
    ) and all(name in params and params[name].shape == t.shape for name, t in whole.items())
    if not plain:  # names this model does not have: leave it to peft, which says what is wrong
        return False
    with torch.no_grad():
        for name, pair in pairs.items():
            weight = modules[name].weight
            weight += (scale * (pair["B"].float() @ pair["A"].float())).to(weight.dtype)
        for name, tensor in whole.items():
            params[name].copy_(tensor)
    logger.info("folded %d LoRA pairs and %d saved tensors from %s", len(pairs), len(whole), folder)
    return True


def adapter_base(
    folder: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    vision: str | Path | None = None,
):
    """The base model of a saved adapter, without the adapter: (VLM, its saved folder, or None for a portable
    adapter's base, which is built from `base.json`). `vision`: a vision checkpoint to build a portable
    adapter's base with instead of its own tower (its width must match the projector's input)."""
    from .model import load_vlm

    folder = Path(folder)
    adapter_config = json.loads(Path(folder, "adapter_config.json").read_text())
    base_path = adapter_config.get("base_model_name_or_path")
    if (folder / BASE_FILE).is_file():
        base = _portable_base(folder, dtype, vision)
        base.model.to(device)
        return base, None
    if vision is not None:
        raise ValueError(
            f"the adapter in {folder} has a saved base ({base_path}); a new vision tower needs a portable "
            "adapter (base.json), whose base is built"
        )
    if not base_path or not Path(base_path, "config.json").is_file():
        raise FileNotFoundError(
            f"the adapter in {folder} points at a base model that is not here: {base_path!r}"
        )
    return load_vlm(base_path, dtype=dtype, device=device), base_path


@without_bitsandbytes()
def load_adapter_weights(vlm, folder: str | Path) -> None:
    """Start the LoRA adapter of `vlm` (made by `apply_lora`) from a saved adapter's weights (LoRA matrices and
    projector), to continue training it; the saved adapter must have the same rank, alpha and targets."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    saved = json.loads(Path(folder, "adapter_config.json").read_text())
    config = vlm.model.peft_config["default"]
    ours = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": config.target_modules}
    theirs = {k: saved.get(k) for k in ours}
    if isinstance(theirs["target_modules"], list):
        theirs["target_modules"] = set(theirs["target_modules"])
    if theirs != ours:
        raise ValueError(
            f"the adapter in {folder} has {theirs}, the run's LoRA has {ours}; set lora.* to match"
        )
    result = set_peft_model_state_dict(vlm.model, load_file(folder / "adapter_model.safetensors"))
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the adapter in {folder} does not fit this model: {len(missing)} trainable weights missing "
            f"(e.g. {missing[:2]}), {len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]})"
        )
    logger.info("LoRA weights and projector start from %s", folder)


@without_bitsandbytes()
def load_adapter(
    folder: str | Path, dtype: str | torch.dtype = "auto", device: str = "cpu", merge: bool = False
):
    """Load a saved adapter onto its base model; `merge=True` folds it into the base weights."""
    from .model import VLM

    folder = Path(folder)
    base, base_path = adapter_base(folder, dtype, device)
    base_path = base_path or str(folder)
    if merge and fold_lora(base.model, folder):
        model = base.model
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base.model, str(folder))
        if merge:
            model = model.merge_and_unload()
    model.eval()
    vlm = VLM(model, base.processor, base.spec)
    vlm.source = base_path
    return vlm


@without_bitsandbytes()
def merge_adapter(vlm):
    """Fold LoRA weights into the base model (in place) so the VLM saves as an ordinary checkpoint."""
    from peft import PeftModel

    if isinstance(vlm.model, PeftModel):
        vlm.model = vlm.model.merge_and_unload()
        vlm.engine.model = vlm.model
        vlm.engine.reset()
    return vlm
