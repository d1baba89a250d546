"""What the world-model stages share beyond the training loop: model shapes and surgery on OWL-ViT/CLIP-style
vision towers (recipe sizes to config kwargs, resizing to another input size, deepening, freezing), loading a
stage's own export to train on, and fp16 copies for export.

The loop itself (schedule, checkpoints, resume, logging) is `train_loop.train`, the same for every stage.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def vit_shape(c: Any) -> dict[str, int]:
    """Vision-transformer config kwargs from a recipe's vision_width/layers/heads, image_size and patch_size."""
    return dict(
        hidden_size=c.vision_width,
        intermediate_size=4 * c.vision_width,
        num_hidden_layers=c.vision_layers,
        num_attention_heads=c.vision_heads,
        image_size=c.image_size,
        patch_size=c.patch_size,
    )


def resize_vision(model: Any, image_size: int) -> Any:
    """The model rebuilt for square inputs of `image_size` pixels, its vision tower's patch-grid position
    embeddings interpolated bicubically (as ViT, CLIP and OWL-ViT fine-tune at a higher resolution); everything
    the config derives from the grid (OWL-ViT's box priors) is rebuilt with it. The same model when the size is
    its own; a size that is not a multiple of the patch size raises."""
    vision = model.config.vision_config
    if image_size == vision.image_size:
        return model
    if image_size % vision.patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {vision.patch_size}")
    name, embeddings = next((n, m) for n, m in model.named_modules() if n.endswith("vision_model.embeddings"))
    state = model.state_dict()
    key = next(k for k in state if k.startswith(f"{name}.position_embedding"))
    with torch.no_grad():
        probe = torch.zeros((1, 1 + (image_size // vision.patch_size) ** 2, vision.hidden_size))
        position = embeddings.interpolate_pos_encoding(probe, image_size, image_size)
    state[key] = position[0] if state[key].dim() == 2 else position  # an Embedding's weight or a Parameter
    resized = rebuilt(model, image_size=image_size)
    resized.load_state_dict(state)
    log.info(
        "%s resized from %d to %d px (%d patches)",
        model.__class__.__name__,
        vision.image_size,
        image_size,
        position.shape[1] - 1,
    )
    return resized


def vision_tower(model: Any) -> Any:
    """The vision transformer of a CLIP/OWL-ViT-style model (its `vision_model`)."""
    return next(m for n, m in model.named_modules() if n.endswith("vision_model"))


def rebuilt(model: Any, **vision: Any) -> Any:
    """A new model of the same class and dtype whose vision config takes `vision`'s values (weights not loaded)."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    for name, value in vision.items():
        setattr(config.vision_config, name, value)
    return model.__class__(config).to(next(model.parameters()).dtype)


def deepen_vision(model: Any, extra: int) -> Any:
    """The model rebuilt with `extra` more layers on top of its vision tower, each starting as the identity (the
    residual branches' output projections zero, as ReZero and zero-init residual blocks start), so that the
    rebuilt model computes what the model did and training grows the new layers from there."""
    if extra <= 0:
        return model
    old = model.config.vision_config.num_hidden_layers
    deeper = rebuilt(model, num_hidden_layers=old + extra)
    missing, unexpected = deeper.load_state_dict(model.state_dict(), strict=False)
    new_layers = tuple(f"vision_model.encoder.layers.{i}." for i in range(old, old + extra))
    strange = [k for k in missing if not any(n in k for n in new_layers)]
    if strange or unexpected:
        raise ValueError(f"deepening failed: missing {strange[:4]}, unexpected {unexpected[:4]}")
    with torch.no_grad():
        for layer in vision_tower(deeper).encoder.layers[old:]:
            for residual_out in (layer.self_attn.out_proj, layer.mlp.fc2):
                residual_out.weight.zero_()
                residual_out.bias.zero_()
    log.info("%s vision tower deepened from %d to %d layers", model.__class__.__name__, old, old + extra)
    return deeper


def freeze_vision(model: Any, layers: int) -> None:
    """Freeze the vision tower's patch and position embeddings, its pre-norm and its first `layers` layers."""
    if layers <= 0:
        return
    vision = vision_tower(model)
    frozen = [vision.embeddings, *[m for n, m in vision.named_children() if n.startswith("pre_lay")]]
    frozen += list(vision.encoder.layers[:layers])
    for module in frozen:
        module.requires_grad_(False)


def load_trained(model_class: Any, folder: str, config: Any = None) -> tuple[Any, Any]:
    """A stage's exported model (in float32, to train on) and its tokenizer, from its export folder. With the
    run's `config`, the model is resized to the config's image_size (`resize_vision`) when it saw another, and
    the config's size fields take the loaded model's sizes (the run's recipe.yaml then tells what was trained,
    not the defaults)."""
    from transformers import AutoTokenizer

    model = model_class.from_pretrained(folder, use_safetensors=True).float()
    if config is not None:
        if config.image_size:
            model = resize_vision(model, config.image_size)
        v, t = model.config.vision_config, model.config.text_config
        sizes = {
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "vision_width": v.hidden_size,
            "vision_layers": v.num_hidden_layers,
            "vision_heads": v.num_attention_heads,
            "text_width": t.hidden_size,
            "text_layers": t.num_hidden_layers,
            "text_heads": t.num_attention_heads,
            "max_length": t.max_position_embeddings,
            "projection_dim": getattr(model.config, "projection_dim", None),
        }
        for name, value in sizes.items():
            if hasattr(config, name) and value is not None:
                setattr(config, name, value)
    return model, AutoTokenizer.from_pretrained(folder)


def fp16_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float16 copy of a module for saving (the trained one stays float32)."""
    import copy

    return copy.deepcopy(module).to(torch.float16)
