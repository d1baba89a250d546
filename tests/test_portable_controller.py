"""The controllers toolvlm saves load and generate in plain transformers (+ peft), without toolvlm.

A tiny random pooled controller is made with toolvlm's own code (a portable adapter exported by
`vlm.export.export_portable`, and a full saved model); a subprocess that cannot import toolvlm loads it with
`AutoModelForImageTextToText` / `AutoProcessor` and must generate the same greedy tokens as toolvlm.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures_portable import run_plain
from fixtures_vlm import random_image, tiny_lm_dir, tiny_spec  # noqa: F401

from toolvlm.vlm import build_vlm, load_vlm
from toolvlm.vlm.export import MODELING_FILE, SMOLLM2_HUB_ID, export_portable
from toolvlm.vlm.lora import LoRASpec, apply_lora, make_portable, save_adapter

BUNDLE = Path(__file__).resolve().parents[1] / "bundle" / "controller"
ARCHITECTURE = Path(__file__).resolve().parents[1] / "vlm" / "architecture.py"

PLAIN_GENERATE = """
import json
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

folder, image_path, max_new_tokens, *lm = sys.argv[1:]
options = {"language_model": lm[0]} if lm else {}
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32, **options)
processor = AutoProcessor.from_pretrained(folder)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What do you see?"}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open(image_path).convert("RGB")], text=text, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=int(max_new_tokens), do_sample=False)
new = out[0, inputs["input_ids"].shape[1]:].tolist()
print(json.dumps({"text": processor.decode(new, skip_special_tokens=True), "class": type(model).__name__,
                  "image_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum())}))
"""
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What do you see?"}]}]


def _perturb_trainables(vlm) -> None:
    """Move the LoRA and projector weights off their initial values, as training would."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in vlm.model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    vlm.model.eval()


def test_portable_adapter_generates_in_plain_transformers(tiny_lm_dir, tmp_path):  # noqa: F811
    spec = tiny_spec(tiny_lm_dir, pooling=2)
    build_vlm(spec, dtype="float32").save(tmp_path / "base")
    folder = tmp_path / "controller"
    tuned = apply_lora(load_vlm(tmp_path / "base", dtype="float32"), LoRASpec(r=4, dropout=0.0))
    tuned.model.base_model.model.model.vision_tower.save_pretrained(folder / "vision")
    _perturb_trainables(tuned)
    save_adapter(tuned, folder)
    spec.vision.checkpoint = "vision"
    make_portable(folder, spec)
    export_portable(folder)
    (tmp_path / "base" / "model.safetensors").unlink()  # the base is assembled from its parts, not loaded

    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_lm_dir.resolve())
    config = json.loads((folder / "config.json").read_text())
    assert config["parts"] == {"language_model": str(tiny_lm_dir.resolve()), "vision_tower": "vision"}
    random_image(5).save(tmp_path / "image.png")
    expected = load_vlm(folder, dtype="float32").generate(MESSAGES, [random_image(5)], max_new_tokens=10)
    got = run_plain(PLAIN_GENERATE, [str(folder), str(tmp_path / "image.png"), "10"], tmp_path)
    assert got["class"] == "ToolVLMForConditionalGeneration"
    assert got["image_tokens"] == 4  # 4 x 4 patches pooled 2 x 2
    # the adapter applied: the same greedy tokens as toolvlm (whose streaming holds back a trailing partial byte)
    assert got["text"].rstrip("\ufffd") == expected.rstrip("\ufffd") and expected


def test_saved_pooled_model_generates_in_plain_transformers(tiny_lm_dir, tmp_path):  # noqa: F811
    vlm = build_vlm(tiny_spec(tiny_lm_dir, pooling=2), dtype="float32")
    vlm.save(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == "toolvlm_llava" and "auto_map" in config
    assert (tmp_path / "model" / MODELING_FILE).read_text() == ARCHITECTURE.read_text()
    random_image(2).save(tmp_path / "image.png")
    expected = vlm.generate(MESSAGES, [random_image(2)], max_new_tokens=8)
    got = run_plain(PLAIN_GENERATE, [str(tmp_path / "model"), str(tmp_path / "image.png"), "8"], tmp_path)
    assert got["text"].rstrip("\ufffd") == expected.rstrip("\ufffd") and got["image_tokens"] == 4


def test_bundle_controller_names_its_base_and_ships_current_code():
    adapter = json.loads((BUNDLE / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == SMOLLM2_HUB_ID
    config = json.loads((BUNDLE / "config.json").read_text())
    assert config["parts"] == {"language_model": SMOLLM2_HUB_ID, "vision_tower": "vision"}
    assert config["image_seq_length"] == 49 and config["image_token_pooling"] == 2
    # the shipped model code is vlm/architecture.py as it is now (rewrite it with vlm.export.export_portable)
    assert (BUNDLE / MODELING_FILE).read_text() == ARCHITECTURE.read_text()


def test_bundle_controller_generates_in_plain_transformers(tmp_path):
    """The committed controller, its base LM given as a local copy (no hub here): toolvlm's reply, token for token."""
    from toolvlm.vlm.base_lm import MissingWeightsError, converted_gguf_dir, smollm2_gguf

    try:
        local_lm = converted_gguf_dir(smollm2_gguf())
    except MissingWeightsError as err:
        pytest.skip(f"the default base LM is not installed: {err}")
    image = random_image(7, size=224)
    image.save(tmp_path / "image.png")
    vlm = load_vlm(BUNDLE, dtype="float32")
    vlm.drafter = None  # plain greedy decoding, as transformers' generate does
    expected = vlm.generate(MESSAGES, [image], max_new_tokens=12)
    args = [str(BUNDLE), str(tmp_path / "image.png"), "12", str(local_lm)]
    got = run_plain(PLAIN_GENERATE, args, tmp_path)
    assert got["image_tokens"] == 49 and got["text"] == expected and expected
