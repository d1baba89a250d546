"""LoRA and QLoRA on tiny VLMs: what trains, saving adapters apart, loading and merging them."""

from __future__ import annotations

import pytest
import torch
from fixtures_vlm import chat, random_image, save_tiny_lm, tiny_lm_dir, tiny_spec  # noqa: F401

from toolvlm.vlm import build_vlm, load_vlm
from toolvlm.vlm.lora import LoRASpec, apply_lora, merge_adapter, quantized_load, save_adapter


def _batch(vlm):
    messages = chat(2)
    images = [random_image(0), random_image(1)]
    rendered = vlm.render(messages, images)
    return dict(
        input_ids=torch.tensor([rendered.input_ids]),
        labels=torch.tensor([rendered.labels]),
        pixel_values=vlm.pixel_values(rendered.images).to(vlm.model.dtype),
    )


@pytest.fixture()
def base_dir(tiny_lm_dir, tmp_path):  # noqa: F811
    vlm = build_vlm(tiny_spec(tiny_lm_dir, pooling=2), dtype="float32")
    vlm.save(tmp_path / "base")
    return tmp_path / "base"


def test_lora_trains_adapters_and_projector_only(base_dir):
    vlm = apply_lora(load_vlm(base_dir, dtype="float32"), LoRASpec(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in vlm.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    assert not any("lora_" in n and "vision_tower" in n for n, _ in vlm.model.named_parameters())
    assert any("q_proj.lora_A" in n for n in trainable) and not any("k_proj.lora_A" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in vlm.model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in vlm.model.parameters() if p.requires_grad], lr=1e-2)
    vlm.model.train()
    loss = vlm.model(**_batch(vlm)).loss
    loss.backward()
    optimizer.step()
    changed = {n for n, p in vlm.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable


def test_adapter_saves_apart_loads_and_merges_to_same_outputs(base_dir, tmp_path):
    vlm = apply_lora(load_vlm(base_dir, dtype="float32"), LoRASpec(r=4, dropout=0.0))
    with torch.no_grad():  # move the adapters and projector away from their identity start
        for param in vlm.model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    vlm.model.eval()
    messages, images = chat(1), [random_image(4)]
    tuned = vlm.generate(messages, images, max_new_tokens=10)
    save_adapter(vlm, tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    reloaded = load_vlm(tmp_path / "adapter", dtype="float32")
    assert reloaded.generate(messages, images, max_new_tokens=10) == tuned
    merged = merge_adapter(reloaded)
    assert merged.generate(messages, images, max_new_tokens=10) == tuned
    folded = load_vlm(tmp_path / "adapter", dtype="float32", merge=True)  # folded without peft
    assert type(folded.model).__name__ == type(merged.model).__name__ != "PeftModelForCausalLM"
    assert folded.generate(messages, images, max_new_tokens=10) == tuned
    for name, param in folded.model.state_dict().items():
        torch.testing.assert_close(param, merged.model.state_dict()[name])
    merged.save(tmp_path / "merged")
    assert (
        load_vlm(tmp_path / "merged", dtype="float32").generate(messages, images, max_new_tokens=10) == tuned
    )


def test_qlora_4bit_forward_and_backward_on_cpu(tmp_path):
    from toolvlm.vlm.model import VLM

    # 64 wide: bitsandbytes' CPU inference kernels quantize in blocks of 64 input features
    base_dir = tmp_path / "base"
    build_vlm(tiny_spec(save_tiny_lm(tmp_path / "lm", hidden=64), pooling=2), dtype="float32").save(base_dir)
    model = quantized_load(base_dir, compute_dtype="float32")
    assert getattr(model, "is_loaded_in_4bit", False)
    base = load_vlm(base_dir, dtype="float32")
    vlm = apply_lora(VLM(model, base.processor, base.spec), LoRASpec(r=4, qlora=True))
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in vlm.model.modules())
    vlm.model.train()
    loss = vlm.model(**_batch(vlm)).loss
    loss.backward()
    grads = [p.grad for n, p in vlm.model.named_parameters() if "lora_" in n]
    assert torch.isfinite(loss) and grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    vlm.model.eval()
    assert isinstance(vlm.generate(chat(1), [random_image(0)], max_new_tokens=4), str)


def test_portable_adapter_builds_its_base_from_a_spec(tiny_lm_dir, tmp_path):  # noqa: F811
    """A portable adapter holds only LoRA + projector; the base is rebuilt from base.json and a relative
    vision folder, and generates exactly as the trained model did."""
    from toolvlm.vlm.lora import BASE_FILE, make_portable

    spec = tiny_spec(tiny_lm_dir, pooling=2)
    vlm = build_vlm(spec, dtype="float32")
    vlm.save(tmp_path / "base")
    vlm.model.model.vision_tower.save_pretrained(tmp_path / "bundle" / "vision")
    vlm = apply_lora(load_vlm(tmp_path / "base", dtype="float32"), LoRASpec(r=4, dropout=0.0))
    with torch.no_grad():
        for param in vlm.model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    vlm.model.eval()
    messages, images = chat(1), [random_image(5)]
    tuned = vlm.generate(messages, images, max_new_tokens=10)
    folder = save_adapter(vlm, tmp_path / "bundle" / "controller")
    spec.vision.checkpoint = "../vision"
    make_portable(folder, spec)
    (tmp_path / "base" / "model.safetensors").unlink()  # the saved base is not needed any more
    assert (folder / BASE_FILE).is_file()
    reloaded = load_vlm(folder, dtype="float32")
    assert reloaded.generate(messages, images, max_new_tokens=10) == tuned

    spec.vision.checkpoint = "../missing"
    make_portable(folder, spec)
    with pytest.raises(FileNotFoundError, match="vision encoder"):
        load_vlm(folder, dtype="float32")


def test_fold_lora_leaves_adapters_it_cannot_fold_to_peft(base_dir, tmp_path):
    import json

    from toolvlm.vlm.lora import fold_lora

    vlm = apply_lora(load_vlm(base_dir, dtype="float32"), LoRASpec(r=4, dropout=0.0))
    with torch.no_grad():
        for param in vlm.model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    folder = save_adapter(vlm, tmp_path / "adapter")
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["use_dora"] = True
    config_path.write_text(json.dumps(config))
    base = load_vlm(base_dir, dtype="float32")
    before = {n: p.clone() for n, p in base.model.state_dict().items()}
    assert fold_lora(base.model, folder) is False
    assert all(torch.equal(p, before[n]) for n, p in base.model.state_dict().items())
    config["use_dora"] = False
    config_path.write_text(json.dumps(config))
    assert fold_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), folder) is False  # none of its names
    assert fold_lora(base.model, folder) is True
    assert any(not torch.equal(p, before[n]) for n, p in base.model.state_dict().items())
