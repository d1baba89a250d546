"""The trainer on a tiny VLM: packing without cross-attention, what each stage trains, resume, 2 processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures_finetune import world_jsonl, write_recipe  # noqa: F401
from fixtures_vlm import tiny_lm_dir, tiny_spec  # noqa: F401

from toolvlm.finetune.data import ConversationDataset, read_jsonl
from toolvlm.finetune.packing import PackedForward, VisionFeatureCache, collate_packed, pack_groups
from toolvlm.finetune.train_checkpoint import latest_checkpoint
from toolvlm.finetune.train_config import load_train_config
from toolvlm.finetune.train_loop import train
from toolvlm.finetune.trainer import ControllerStage
from toolvlm.vlm import build_vlm, load_vlm
from toolvlm.vlm.images import load_image


@pytest.fixture(scope="module")
def vlm(tiny_lm_dir):  # noqa: F811
    return build_vlm(tiny_spec(tiny_lm_dir, pooling=2), dtype="float32")


def test_packing_fits_budget_and_keeps_every_example():
    lengths = [30, 50, 20, 70, 10, 90, 40]
    groups = pack_groups(lengths, 100, seed=0)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 100 for g in groups)
    assert len(groups) < len(lengths)
    assert pack_groups(lengths, 100, seed=0, packing=False) == [
        [i] for g in pack_groups(lengths, 100, 0, False) for i in g
    ]


def test_packed_logits_equal_each_example_alone(vlm, world_jsonl):  # noqa: F811
    dataset = ConversationDataset(read_jsonl(world_jsonl)[:3], vlm)
    items = [dataset[i] for i in range(3)]
    forward = PackedForward(vlm.model).eval()
    cache = VisionFeatureCache(vlm)
    packed = collate_packed(items)
    assert packed.position_ids[0].tolist() == [p for it in items for p in range(len(it))]
    with torch.no_grad():
        together = forward.logits(
            packed.input_ids, packed.position_ids, cache.get(packed.images, packed.image_keys)
        )
        offset = 0
        for item in items:
            alone = collate_packed([item])
            logits = forward.logits(
                alone.input_ids, alone.position_ids, cache.get(alone.images, alone.image_keys)
            )
            torch.testing.assert_close(together[:, offset : offset + len(item)], logits, atol=1e-4, rtol=1e-4)
            offset += len(item)
        # control: with positions running on, attention crosses examples and the later ones change
        crossing = forward.logits(
            packed.input_ids, torch.arange(packed.n_tokens)[None], cache.get(packed.images, packed.image_keys)
        )
        assert (crossing[:, len(items[0]) :] - together[:, len(items[0]) :]).abs().max() > 1e-2
        # and the packed path equals transformers' own forward of the example
        item = items[0]
        reference = vlm.model(
            input_ids=torch.tensor([item.input_ids]),
            pixel_values=vlm.pixel_values([load_image(p) for p in item.images]),
        ).logits
        torch.testing.assert_close(together[:, : len(item)], reference, atol=1e-4, rtol=1e-4)
    assert cache.hits >= len(packed.images)  # each image was encoded once


class Trainer:
    """A controller stage and its config, trained by the one loop."""

    def __init__(self, config):
        self.config, self.stage = config, None

    def setup(self) -> None:
        self.stage = ControllerStage(self.config)
        self.vlm = self.stage.vlm

    def train(self):
        if self.stage is None:
            self.setup()
        return train(self.stage, self.config)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before: dict, model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p.detach())}


def test_stage1_trains_only_the_projector(tmp_path, tiny_lm_dir, world_jsonl):  # noqa: F811
    recipe = write_recipe(tmp_path, tiny_lm_dir, world_jsonl, stage=1, steps=2)
    trainer = Trainer(load_train_config(recipe))
    trainer.setup()
    before = _snapshot(trainer.vlm.model)
    result = trainer.train()
    changed = _changed(before, trainer.vlm.model)
    assert changed and all("multi_modal_projector" in n for n in changed)
    assert result.steps == 2 and len(result.losses) == 2
    saved = load_vlm(tmp_path / "out" / "model", dtype="float32")
    proj = saved.model.model.multi_modal_projector.linear_1.weight
    torch.testing.assert_close(proj, trainer.vlm.model.model.multi_modal_projector.linear_1.weight)


def test_stage2_trains_lora_and_projector_only(tmp_path, tiny_lm_dir, world_jsonl):  # noqa: F811
    recipe = write_recipe(tmp_path, tiny_lm_dir, world_jsonl, stage=2, steps=2, export_merged=True)
    trainer = Trainer(load_train_config(recipe, ["lora.r=4", "lora.dropout=0.0"]))
    trainer.setup()
    before = _snapshot(trainer.vlm.model)
    trainable = {n for n, p in trainer.vlm.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    trainer.train()
    out = tmp_path / "out"
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "merged" / "config.json").is_file()
    adapter = load_vlm(out / "adapter", dtype="float32")
    lora_b = [p for n, p in adapter.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained (LoRA B starts at zero)
    merged = load_vlm(out / "merged", dtype="float32")
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        torch.testing.assert_close(
            adapter.model(input_ids=ids).logits, merged.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )
    base = load_vlm(out / "base", dtype="float32")
    for name, param in base.model.named_parameters():
        if "multi_modal_projector" not in name:
            torch.testing.assert_close(param, before_base_param(before, name))


def before_base_param(before: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The pre-training value of a base parameter under its peft name."""
    for key, value in before.items():
        if key.endswith(name) or key.replace(".base_layer", "").endswith(name):
            return value
    raise KeyError(name)


def test_stage2_continues_a_portable_adapter_from_its_weights(tmp_path, tiny_lm_dir, world_jsonl):  # noqa: F811
    from safetensors.torch import load_file

    from toolvlm.finetune.export_bundle import base_model
    from toolvlm.vlm.config import VLMSpec
    from toolvlm.vlm.lora import make_portable

    first = tmp_path / "a"
    first.mkdir()
    recipe = write_recipe(first, tiny_lm_dir, world_jsonl, stage=2, steps=2, pack_tokens=600)
    Trainer(load_train_config(recipe, ["lora.r=4"])).train()
    portable = tmp_path / "portable"  # as in the bundle: the base is a spec, the vision tower beside it
    shutil.copytree(first / "out" / "adapter", portable)
    load_vlm(first / "out" / "base", dtype="float32").model.model.vision_tower.save_pretrained(
        portable / "vision"
    )
    spec = VLMSpec.load(first / "out" / "base")
    spec.vision.checkpoint = "vision"
    make_portable(portable, spec)

    overrides = ["lora.r=4", "model.spec=null", f"model.adapter={portable}", f"run_dir={tmp_path / 'b'}"]
    trainer = Trainer(load_train_config(recipe, overrides))
    trainer.setup()
    saved = load_file(portable / "adapter_model.safetensors")
    params = dict(trainer.vlm.model.named_parameters())
    for key, tensor in saved.items():  # every LoRA matrix and the projector start where the adapter ended
        name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )
        name = name.replace("multi_modal_projector.", "multi_modal_projector.modules_to_save.default.")
        torch.testing.assert_close(params[name].detach(), tensor.float())
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())  # trained, not a fresh LoRA
    result = trainer.train()
    assert result.steps == 2
    assert base_model(tmp_path / "b") == (tmp_path / "b" / "base").resolve()  # what export_bundle reads
    assert load_vlm(tmp_path / "b" / "adapter", dtype="float32") is not None
    with pytest.raises(ValueError, match="'r': 4"):
        Trainer(load_train_config(recipe, [*overrides[1:], "lora.r=8"])).setup()
    with pytest.raises(ValueError, match="exactly one of"):
        load_train_config(recipe, [f"model.adapter={portable}"])

    # model.vision: the same adapter continued on another tower of the same width, here at 48 px (36 patches)
    from transformers import CLIPVisionConfig, CLIPVisionModel

    old = load_vlm(first / "out" / "base", dtype="float32").model.model.vision_tower
    config = CLIPVisionConfig(**{**old.config.to_dict(), "image_size": 48})
    torch.manual_seed(3)
    sharper = CLIPVisionModel(config)
    sharper.save_pretrained(tmp_path / "sharper")
    overrides = [*overrides[:3], f"model.vision={tmp_path / 'sharper'}", f"run_dir={tmp_path / 'c'}"]
    trainer = Trainer(load_train_config(recipe, overrides))
    trainer.setup()
    tower = trainer.vlm.model.base_model.model.model.vision_tower
    assert tower.config.image_size == 48
    for name, tensor in sharper.state_dict().items():  # the new tower's weights, not the adapter's base's
        torch.testing.assert_close(tower.state_dict()[name].float(), tensor)
    params = dict(trainer.vlm.model.named_parameters())
    projector = "multi_modal_projector.modules_to_save.default.linear_1.weight"
    torch.testing.assert_close(
        next(v for k, v in params.items() if k.endswith(projector)).detach(),
        saved["base_model.model.model.multi_modal_projector.linear_1.weight"].float(),
    )
    assert trainer.train().steps == 2
    assert load_vlm(tmp_path / "c" / "base", dtype="float32").model.config.vision_config.image_size == 48
    with pytest.raises(ValueError, match="give model.adapter too"):
        load_train_config(recipe, [f"model.vision={tmp_path / 'sharper'}"])
    with pytest.raises(ValueError, match="needs a portable adapter"):
        overrides = ["lora.r=4", "model.spec=null", f"model.adapter={first / 'out' / 'adapter'}"]
        Trainer(load_train_config(recipe, [*overrides, f"model.vision={tmp_path / 'sharper'}"])).setup()


def test_checkpoint_and_resume_continue_the_step_count_and_the_loss(tmp_path, tiny_lm_dir, world_jsonl):  # noqa: F811
    first = tmp_path / "a"
    first.mkdir()
    recipe = write_recipe(first, tiny_lm_dir, world_jsonl, stage=2, steps=4, save_every=2, pack_tokens=600)
    straight = Trainer(load_train_config(recipe, ["resume=no"])).train()
    assert latest_checkpoint(first / "out").name == "step_0000004"  # the last two kept: 2 and 4
    second = tmp_path / "b"
    step2 = "checkpoints/step_0000002"
    shutil.copytree(first / "out" / step2, second / "out" / step2)
    shutil.copytree(first / "out" / "base", second / "out" / "base")
    resumed_trainer = Trainer(
        load_train_config(
            recipe,
            [f"run_dir={second / 'out'}", f"model.base={second / 'out' / 'base'}", "model.spec=null"],
        )
    )
    resumed = resumed_trainer.train()
    assert resumed.steps == 4
    log = [json.loads(line) for line in (second / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 4]  # it continued at step 3
    torch.testing.assert_close(
        torch.tensor(resumed.losses), torch.tensor(straight.losses), atol=1e-5, rtol=1e-5
    )


def test_activation_checkpointing_gives_the_same_losses(tmp_path, tiny_lm_dir, world_jsonl):  # noqa: F811
    recipe = write_recipe(tmp_path, tiny_lm_dir, world_jsonl, stage=2, steps=2, pack_tokens=600)
    plain = Trainer(load_train_config(recipe, ["resume=no"])).train()
    recomputed = Trainer(load_train_config(recipe, ["resume=no", "gradient_checkpointing=true"])).train()
    torch.testing.assert_close(
        torch.tensor(recomputed.losses), torch.tensor(plain.losses), atol=1e-5, rtol=1e-5
    )


def test_qlora_option_trains_on_a_4bit_base(tmp_path, world_jsonl):  # noqa: F811
    from fixtures_vlm import save_tiny_lm

    lm = save_tiny_lm(tmp_path / "lm", hidden=64)  # 4-bit blocks need rows of 64
    build_vlm(tiny_spec(lm, pooling=2), dtype="float32").save(tmp_path / "base")
    recipe = write_recipe(tmp_path, lm, world_jsonl, stage=2, steps=2, pack_tokens=600)
    overrides = ["lora.qlora=true", "lora.r=4", "model.spec=null", f"model.base={tmp_path / 'base'}"]
    trainer = Trainer(load_train_config(recipe, overrides))
    result = trainer.train()
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert getattr(trainer.vlm.model, "is_loaded_in_4bit", False) or any(
        "4bit" in type(m).__name__ for m in trainer.vlm.model.modules()
    )
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_two_process_accelerate_run(tmp_path, tiny_lm_dir, world_jsonl):  # noqa: F811
    recipe = write_recipe(tmp_path, tiny_lm_dir, world_jsonl, stage=2, steps=2, pack_tokens=600)
    # two CPU processes (gloo): accelerate's launcher starts them; ACCELERATE_USE_CPU makes the state MULTI_CPU
    # (in accelerate 1.15 `--cpu` alone starts a single process)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", "29533", "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "toolvlm", "finetune", str(recipe)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2
    assert (Path(summary["run"]) / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((Path(summary["run"]) / "result.json").read_text())["processes"] == 2


def test_cli_prints_resolved_config_and_refuses_unknown_keys(tmp_path, tiny_lm_dir, world_jsonl, capsys):  # noqa: F811
    from toolvlm.cli import main

    recipe = write_recipe(tmp_path, tiny_lm_dir, world_jsonl)
    assert main(["finetune", str(recipe), "lora.r=4", "steps=7", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "steps: 7" in printed and "r: 4" in printed
    assert main(["finetune", str(recipe), "max_steps=7"]) == 2  # a renamed key names its new name
    assert "'max_steps' is now steps" in capsys.readouterr().err
    assert main(["finetune", str(recipe), "lora.rank=4"]) == 2
    assert "lora.rank: unknown key; keys are: r, alpha" in capsys.readouterr().err


def test_half_precision_frozen_weights_need_autocast(tmp_path, tiny_lm_dir, world_jsonl):  # noqa: F811
    recipe = write_recipe(tmp_path, tiny_lm_dir, world_jsonl, stage=2, steps=1)
    with pytest.raises(ValueError, match="model.dtype=bfloat16 .*bf16 autocast"):
        ControllerStage(load_train_config(recipe, ["model.dtype=bfloat16", "bf16=false"]))


def test_overrides_read_exponent_numbers_as_numbers():
    from toolvlm.recipes import parse_overrides

    parsed = parse_overrides(["optim.lr=1e-3", "name=run1", "steps=10", "x=", "tag=nan"])
    assert parsed == {"optim": {"lr": 0.001}, "name": "run1", "steps": 10, "x": "", "tag": "nan"}
