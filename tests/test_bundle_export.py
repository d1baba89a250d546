"""export_bundle: a stage-2 run becomes a small portable controller folder that loads and generates as trained."""

from __future__ import annotations

import pytest
import torch
import yaml
from fixtures_vlm import chat, random_image, tiny_lm_dir, tiny_spec  # noqa: F401

from toolvlm.agent.profiles import load_profile
from toolvlm.finetune.data import Example, write_jsonl
from toolvlm.finetune.export_bundle import export_bundle
from toolvlm.vlm import build_vlm, load_vlm
from toolvlm.vlm.drafting import CORPUS_FILE, read_corpus
from toolvlm.vlm.lora import LoRASpec, apply_lora, save_adapter


def test_controller_part_is_portable_fp16_and_generates_as_trained(tiny_lm_dir, tmp_path):  # noqa: F811
    spec = tiny_spec(tiny_lm_dir, pooling=2)
    vlm = build_vlm(spec, dtype="float32")
    vlm.model.model.vision_tower.save_pretrained(tmp_path / "vision")
    spec.vision.checkpoint = str(tmp_path / "vision")
    vlm.spec = spec
    vlm.save(tmp_path / "stage1" / "model")
    run = tmp_path / "stage2"
    tuned = apply_lora(load_vlm(tmp_path / "stage1" / "model", dtype="float32"), LoRASpec(r=4, dropout=0.0))
    with torch.no_grad():
        for param in tuned.model.parameters():
            if param.requires_grad:  # trained weights that fp16 holds exactly, so the export loses nothing
                param.add_(0.3 * torch.randn_like(param)).copy_(param.half().float())
    tuned.model.eval()
    messages, images = chat(1), [random_image(3)]
    expected = tuned.generate(messages, images, max_new_tokens=8)
    save_adapter(tuned, run / "adapter")
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": {"base": "the run's recipe"}}))
    reply = {"role": "assistant", "content": expected}
    write_jsonl(run / "data" / "world" / "world.jsonl", [Example([*messages, reply], images)])

    bundle = tmp_path / "bundle"
    other = build_vlm(
        spec, dtype="float32"
    ).model.model.vision_tower  # another tower saved where stage 1's was
    with torch.no_grad():
        for param in other.parameters():
            param.add_(torch.randn_like(param))
    other.save_pretrained(tmp_path / "other_vision")
    with pytest.raises(ValueError, match="not the vision tower"):
        export_bundle({"controller": run}, bundle, controller_vision=tmp_path / "other_vision")
    export_bundle({"controller": run}, bundle)
    (tmp_path / "vision" / "model.safetensors").unlink()  # the bundle has its own copy
    controller = bundle / "controller"
    assert (controller / "vision" / "config.json").is_file() and (controller / "base.json").is_file()
    card = (controller / "README.md").read_text()  # a model card of its own, not peft's empty template
    assert "r=4" in card and "More Information Needed" not in card
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(controller / "adapter_model.safetensors").values()} == {torch.float16}
    assert read_corpus(controller / CORPUS_FILE) == [expected]  # its training replies, to draft from
    reloaded = load_vlm(controller, dtype="float32")
    assert reloaded.drafter is not None
    assert reloaded.generate(messages, images, max_new_tokens=8) == expected
    profile = load_profile(bundle / "profile.yaml")
    assert profile.controller["model"] == str(controller) and profile.agent["prompts"] == "compact"


def test_unknown_part_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown bundle part"):
        export_bundle({"vocoder": tmp_path}, tmp_path / "bundle")
