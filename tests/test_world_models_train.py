"""Each world-model stage trains a few steps at a tiny size, and its export loads through its tools backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from toolvlm.finetune.train_stages import run_stage
from toolvlm.tools.registry import build_tools
from toolvlm.world import CATEGORIES, render_scene, sample_scene

TINY_TOWERS = [
    "image_size=32",
    "patch_size=16",
    "vision_width=32",
    "vision_layers=1",
    "vision_heads=2",
    "text_width=32",
    "text_layers=1",
    "text_heads=2",
    "tokenizer_scenes=10",
    "batch_size=2",
    "log_every=1",
    "save_every=1",
    "warmup_steps=1",
]


def tiny_encoder_overrides(run: Path, steps: int = 2) -> list[str]:
    """A 1-layer, 32-wide encoder on 32 px images."""
    return [f"run_dir={run}", f"steps={steps}", "projection_dim=32", "max_length=24", *TINY_TOWERS]


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory) -> Path:
    return run_stage("encoder", None, tiny_encoder_overrides(tmp_path_factory.mktemp("enc") / "run")).run


@pytest.fixture(scope="module")
def detector_run(tmp_path_factory, encoder_run) -> Path:
    run = tmp_path_factory.mktemp("det") / "run"
    overrides = [f"run_dir={run}", f"init_from={encoder_run / 'export'}", "steps=2", "batch_size=2"]
    return run_stage("detector", None, [*overrides, "warmup_steps=1", "save_every=1"]).run


def test_detector_continues_from_a_trained_export_with_its_heads(detector_run, tmp_path):
    from safetensors.torch import load_file

    from toolvlm.finetune.train_detector import DetectorConfig, DetectorStage

    export = str(detector_run / "export")
    stage = DetectorStage(DetectorConfig(run_dir=str(tmp_path), continue_from=export, scene_offset=5))
    saved = load_file(detector_run / "export" / "model.safetensors")
    params = dict(stage.model.named_parameters())
    for name in ("box_head.dense2.weight", "class_head.logit_shift.bias", "owlvit.logit_scale"):
        torch.testing.assert_close(params[name].detach(), saved[name].float())  # not re-drawn
    assert stage.tokenizer("a red frisbee")["input_ids"]  # the export's own tokenizer
    fresh = stage.items(0)[0][0]["ann"]  # fresh training scenes: the first is the plain run's sixth
    plain = DetectorStage(DetectorConfig(run_dir=str(tmp_path), continue_from=export)).items(0)
    assert stage.data.offset == 10**7 + 5 and fresh == plain[5][0]["ann"]


def test_detector_resized_to_a_larger_input_equals_interpolated_position_embeddings(detector_run, tmp_path):
    from transformers import AutoProcessor, OwlViTForObjectDetection

    from toolvlm.finetune.train_common import resize_vision
    from toolvlm.finetune.train_detector import DetectorConfig, DetectorStage

    model = OwlViTForObjectDetection.from_pretrained(detector_run / "export").float().eval()
    resized = resize_vision(model, 64).eval()  # 2x2 patches -> 4x4
    assert resized.box_bias.shape == (16, 4) and resized.config.vision_config.image_size == 64
    tokens = AutoProcessor.from_pretrained(detector_run / "export").tokenizer(
        ["dog", "ball"], padding=True, return_tensors="pt"
    )
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(**tokens, pixel_values=pixels, interpolate_pos_encoding=True)
        out = resized(**tokens, pixel_values=pixels)
    assert out.logits.shape == (1, 16, 2)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.pred_boxes, ref.pred_boxes)
    assert resize_vision(model, 32) is model
    with pytest.raises(ValueError, match="multiple of the patch size"):
        resize_vision(model, 40)
    # a stage continued at 64 px exports a processor that feeds 64 px images to the tools
    stage = DetectorStage(
        DetectorConfig(run_dir=str(tmp_path), continue_from=str(detector_run / "export"), image_size=64)
    )
    stage.export(tmp_path / "export")
    processor = AutoProcessor.from_pretrained(tmp_path / "export")
    assert processor.image_processor.size == {"height": 64, "width": 64}
    tools = build_tools({"grounding": {"backend": "inhouse", "model": str(tmp_path / "export")}})
    found = tools["grounding"](image=render_scene(sample_scene(1)), phrase="dog", threshold=0.0)
    assert len(found.artifact["boxes"]) > 0


def test_encoder_trains_resumes_and_exports(encoder_run, tmp_path):
    log = [json.loads(line) for line in (encoder_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    state = json.loads((encoder_run / "checkpoints" / "step_0000002" / "state.json").read_text())
    assert state["step"] == 2 and len(state["losses"]) == 2
    export = encoder_run / "export"
    assert (export / "model.safetensors").is_file() and (export / "recipe.yaml").is_file()
    # resuming to 3 steps runs one more step only
    run_stage("encoder", None, tiny_encoder_overrides(encoder_run, steps=3) + ["export_at_end=false"])
    log = [json.loads(line) for line in (encoder_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]


def test_clip_vision_export_equals_the_owlvit_vision_tower(encoder_run):
    from transformers import CLIPVisionModel, OwlViTModel

    owl = OwlViTModel.from_pretrained(encoder_run / "export").float().eval()
    clip = CLIPVisionModel.from_pretrained(encoder_run / "export" / "vision").float().eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = owl.vision_model(pixel_values=pixels)
        b = clip(pixel_values=pixels)
    assert torch.allclose(a.last_hidden_state, b.last_hidden_state, atol=1e-5)
    assert torch.allclose(a.pooler_output, b.pooler_output, atol=1e-5)


def test_detector_loads_in_grounding_and_counter(detector_run):
    tools = build_tools(
        {"grounding": {"backend": "inhouse", "model": str(detector_run / "export")}, "counter": {}}
    )
    image = render_scene(sample_scene(1))
    found = tools["grounding"](image=image, phrase="dog", threshold=0.0)
    assert found.artifact["boxes"]
    counted = tools["counter"](image=image, phrase="person", threshold=0.0)
    assert counted.artifact["count"] == len(counted.artifact["boxes"]) > 0


@pytest.fixture(scope="module")
def captioner_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cap") / "run"
    return run_stage("captioner", None, [f"run_dir={run}", "steps=1", "max_length=48", *TINY_TOWERS]).run


@pytest.mark.parametrize("stage", ["encoder", "captioner"])
def test_encoder_and_captioner_continue_from_a_trained_export(stage, encoder_run, captioner_run, tmp_path):
    from safetensors.torch import load_file

    from toolvlm.finetune.train_stages import stage_classes

    run = {"encoder": encoder_run, "captioner": captioner_run}[stage]
    saved = load_file(run / "export" / "model.safetensors")
    config_class, stage_class = stage_classes(stage)
    continued = stage_class(
        config_class(run_dir=str(tmp_path), continue_from=str(run / "export"), image_size=32)
    )
    params = dict(continued.model.named_parameters())
    assert set(saved) <= set(dict(continued.model.state_dict()))
    # the run's config (its recipe.yaml) takes the loaded sizes, not the defaults it was made with
    assert (continued.config.vision_width, continued.config.text_layers) == (32, 1)
    for name in list(saved)[:: max(1, len(saved) // 8)]:
        if name in params:
            torch.testing.assert_close(params[name].detach(), saved[name].float())  # trained, not re-drawn
    assert (
        continued.tokenizer.get_vocab()
        == json.loads((run / "export" / "tokenizer.json").read_text())["model"]["vocab"]
    )  # the export's own tokenizer, not one learned again from today's world texts
    # a recipe at another size continues at that size, the position embeddings interpolated
    larger = stage_class(
        config_class(run_dir=str(tmp_path), continue_from=str(run / "export"), image_size=64)
    )
    assert larger.config.image_size == larger.model.config.vision_config.image_size == 64
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = continued.model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True)
        out = larger.model.vision_model(pixel_values=pixels)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        stage_class(config_class(run_dir=str(tmp_path), continue_from=str(run / "export"), image_size=40))


@pytest.fixture(scope="module")
def generator_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("gen") / "run"
    overrides = [f"run_dir={run}", "steps=1", "batch_size=2", "image_size=16"]
    return run_stage("generator", None, [*overrides, "block_out_channels=[8, 16]", "norm_num_groups=4"]).run


def test_generated_set_resumes_and_feeds_the_detector_category_queries(generator_run, detector_run, tmp_path):
    import numpy as np
    from PIL import Image

    from toolvlm.finetune.generated_set import GeneratedScenes, read_samples, write_generated_set
    from toolvlm.finetune.train_detector import DetectorConfig, DetectorStage
    from toolvlm.finetune.world_data import layout_of, scene_seed
    from toolvlm.tools.layout_diffusion import LayoutDiffusion
    from toolvlm.world import annotate

    folder, generator = tmp_path / "generated", generator_run / "export"
    assert write_generated_set(generator, folder, n=3, steps=1, batch_size=2) == 3
    assert write_generated_set(generator, folder, n=5, steps=1, batch_size=2) == 2  # resumed, not redone
    records = read_samples(folder)
    assert [r["seed"] for r in records] == [0, 1, 2, 3, 4] and len({r["index"] for r in records}) == 5
    item = GeneratedScenes(str(folder), image_size=32)[4]
    ann = annotate(sample_scene(scene_seed("train", records[4]["index"])))
    assert item["ann"] == ann and item["image"].size == (ann["width"], ann["height"])
    assert item["pixels"].shape == (3, 32, 32)
    # the stored image is the generator's own sample of that scene's layout with that seed
    again = LayoutDiffusion.from_pretrained(generator).generate(layout_of(ann), seed=4, steps=1)
    stored = np.asarray(Image.open(folder / records[4]["image"]), dtype=int)
    assert np.abs(np.asarray(again, dtype=int) - stored).max() <= 1

    config = DetectorConfig(
        run_dir=str(tmp_path / "det"), continue_from=str(detector_run / "export"), batch_size=3,
        generated=str(folder), p_generated=1.0,
    )  # fmt: skip
    stage = DetectorStage(config)
    batch = stage.batch(0)
    assert all(set(t.kinds) <= {"category", "negative"} for t in batch["targets"])
    loss, parts = stage.loss(batch)
    assert torch.isfinite(loss) and parts["cls"] > 0
    with pytest.raises(ValueError, match="generated"):
        DetectorStage(
            DetectorConfig(run_dir=str(tmp_path / "d2"), continue_from=config.continue_from, p_generated=0.5)
        )


def test_detector_focus_draws_scenes_that_hold_the_focus_categories(detector_run, tmp_path):
    from toolvlm.finetune.train_detector import DetectorConfig, DetectorStage

    def stage(**options) -> DetectorStage:
        return DetectorStage(
            DetectorConfig(
                run_dir=str(tmp_path), continue_from=str(detector_run / "export"), batch_size=8, **options
            )
        )

    def birds(s: DetectorStage, step: int) -> list[int]:
        return [sum(o["category"] == "bird" for o in it["ann"]["objects"]) for it, _ in s.items(step)]

    assert all(birds(stage(focus=["bird"], p_focus=1.0), 0))  # every image holds a bird
    plain = [n for step in range(3) for n in birds(stage(), step)]
    assert sum(n > 0 for n in plain) < len(plain)  # (about a quarter of world scenes do)
    assert birds(stage(focus=["bird"], p_focus=1.0), 1) == birds(stage(focus=["bird"], p_focus=1.0), 1)
    with pytest.raises(ValueError, match="focus must name world categories"):
        stage(focus=["unicorn"], p_focus=0.5)
    with pytest.raises(ValueError, match="focus must name world categories"):
        stage(p_focus=0.5)


def test_captioner_loads_in_the_captioner_tool(captioner_run):
    run = captioner_run
    tools = build_tools(
        {"captioner": {"backend": "inhouse", "model": str(run / "export"), "max_new_tokens": 4}}
    )
    out = tools["captioner"](image=render_scene(sample_scene(2)))
    assert isinstance(out.artifact["caption"], str)


def test_generator_loads_in_the_generator_tool(generator_run):
    run = generator_run
    tools = build_tools({"generator": {"backend": "inhouse", "model": str(run / "export"), "steps": 2}})
    out = tools["generator"](boxes=[[2, 2, 8, 12]], phrases=["person"], width=16, height=16)
    assert out.images[0].size == (16, 16)


def test_eval_world_models_runs_on_tiny_checkpoints(
    encoder_run, detector_run, captioner_run, generator_run, capsys
):
    from toolvlm.cli import main

    parts = {
        "encoder": encoder_run,
        "detector": detector_run,
        "captioner": captioner_run,
        "generator": generator_run,
    }
    argv = ["eval", "world-models", "--json", "--n", "2", "--n-generate", "1", "--gen-steps", "1"]
    for part, run in parts.items():
        argv += [f"--{part}", str(run / "export")]
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= results["encoder"]["presence_accuracy"] <= 1
    assert {"ap50_category", "ap50_colour", "referring_accuracy"} <= set(results["grounding"])
    assert "exact_upto_30" in results["counting"]
    assert 0 <= results["captioner"]["object_f1"] <= 1
    generator = results["generator"]
    assert generator["n"] == 1 and 0 <= generator["reference_agreement"] <= 1
    # the pooled figure is the mean over every (layout, category) pair, so it is never below "all agree"
    assert generator["count_agreement"] <= generator["category_agreement"] <= 1
    assert set(generator["per_category"]) <= set(CATEGORIES) and generator["per_category"]
    assert results["skipped"] == {}
    assert main([*argv, "--parts", "captioner"]) == 0  # one part alone
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert alone["captioner"] == results["captioner"] and "grounding" not in alone
    assert alone["skipped"]["detector"] == "not asked for"
    assert main([*argv, "--parts", "decoder"]) == 2


def test_eval_skips_absent_parts(tmp_path, monkeypatch, capsys):
    from toolvlm.cli import main

    monkeypatch.setenv("TOOLVLM_BUNDLE", str(tmp_path))
    assert main(["eval", "world-models", "--json", "--n", "1"]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(results["skipped"]) == {"encoder", "detector", "captioner", "generator"}


def test_detector_training_forward_equals_the_model_forward(detector_run):
    from transformers import AutoProcessor, OwlViTForObjectDetection

    from toolvlm.finetune.train_detector import detector_outputs

    model = OwlViTForObjectDetection.from_pretrained(detector_run / "export").float().eval()
    tokenizer = AutoProcessor.from_pretrained(detector_run / "export").tokenizer
    phrases = ["dog", "person in a red shirt", "the red frisbee next to the dog"]
    pixels = torch.randn(1, 3, 32, 32)
    tokens = tokenizer(phrases, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels
        )
        # the batch's distinct phrases once, padded longer, queried in another order
        many = tokenizer(["ball", *phrases], padding="max_length", max_length=20, return_tensors="pt")
        index = torch.tensor([[1, 2, 3]])
        logits, boxes = detector_outputs(model, pixels, many, index, torch.ones_like(index, dtype=torch.bool))
    assert torch.allclose(ref.logits, logits, atol=1e-4)
    assert torch.allclose(ref.pred_boxes, boxes, atol=1e-5)


def test_reorder_specials_moves_the_special_rows():
    from transformers.models.clip import CLIPTokenizer

    from toolvlm.finetune.world_tokenizer import (
        BOS,
        EOS,
        PAD,
        _backend_merges,
        build_tokenizer,
        reorder_specials,
    )

    new = build_tokenizer(max_length=16, n_scenes=10)
    vocab = dict(new.get_vocab())
    n = len(vocab)
    vocab[BOS], vocab[EOS], vocab[PAD] = n - 3, n - 2, n - 1  # an older order: PAD highest
    old = CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in _backend_merges(new)], pad_token=PAD)
    embeddings = torch.nn.Embedding(n, 4)
    before = embeddings.weight.detach().clone()
    fixed = reorder_specials(old, embeddings)
    assert fixed.convert_tokens_to_ids(EOS) == n - 1
    assert torch.equal(embeddings.weight[n - 1], before[n - 2])  # EOS's row moved with it
    assert fixed("a red dog")["input_ids"][1:-1] == old("a red dog")["input_ids"][1:-1]
    assert reorder_specials(new, embeddings) is new


def test_encoder_deepened_on_a_trained_tower_starts_as_it_and_trains_only_the_new_layers(
    encoder_run, tmp_path
):
    from toolvlm.finetune.train_encoder import EncoderConfig, EncoderStage

    def stage(**options) -> EncoderStage:
        return EncoderStage(
            EncoderConfig(
                run_dir=str(tmp_path), continue_from=str(encoder_run / "export"), image_size=32, **options
            )
        )

    base, deeper = stage(), stage(add_layers=2, freeze_layers=1)
    assert len(deeper.model.vision_model.encoder.layers) == deeper.config.vision_layers == 3
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            deeper.model.get_image_features(pixel_values=pixels).pooler_output,
            base.model.get_image_features(pixel_values=pixels).pooler_output,
        )  # the new layers start as the identity
    loss, _ = deeper.loss(deeper.batch(0))
    loss.backward()
    layers = deeper.model.vision_model.encoder.layers
    assert all(p.grad is None and not p.requires_grad for p in layers[0].parameters())
    assert all(not p.requires_grad for p in deeper.model.vision_model.embeddings.parameters())
    assert layers[1].self_attn.out_proj.weight.grad.abs().sum() > 0  # the zero projections learn
    assert deeper.model.text_model.embeddings.token_embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="continue_from"):
        EncoderStage(EncoderConfig(run_dir=str(tmp_path), add_layers=1, tokenizer_scenes=10))


def test_presence_loss_classifies_each_category_pair(tmp_path):
    from toolvlm.finetune.train_encoder import EncoderConfig, EncoderStage
    from toolvlm.world import CATEGORIES

    config = EncoderConfig(
        run_dir=str(tmp_path), image_size=32, patch_size=16, vision_width=32, vision_layers=1, vision_heads=2,
        text_width=32, text_layers=1, text_heads=2, projection_dim=32, tokenizer_scenes=10, batch_size=3,
        w_presence=1.0,
    )  # fmt: skip
    stage = EncoderStage(config)
    batch = stage.batch(0)
    assert batch["tokens"]["input_ids"].shape[0] == 3 + 2 * len(CATEGORIES)
    loss, figures = stage.loss(batch)
    assert 0 <= figures["presence_acc"] <= 1 and figures["presence"] > 0
    loss.backward()
    assert stage.model.text_model.embeddings.token_embedding.weight.grad.abs().sum() > 0


def test_detector_exports_its_vision_tower_and_ships_a_count_threshold(detector_run, tmp_path):
    import shutil

    from transformers import CLIPVisionModel

    from toolvlm.tools.detectors import CALIBRATION

    export = detector_run / "export"
    assert CLIPVisionModel.from_pretrained(export / "vision").config.hidden_size == 32
    folder = tmp_path / "detector"
    shutil.copytree(export, folder)
    (folder / CALIBRATION).write_text(json.dumps({"count_threshold": 0.0, "grounding_threshold": 0.0}))
    tools = build_tools({"grounding": {"backend": "inhouse", "model": str(folder)}, "counter": {}})
    image = render_scene(sample_scene(1))
    assert tools["counter"](image=image, phrase="person").artifact["threshold"] == 0.0
    assert tools["grounding"](image=image, phrase="dog").artifact["threshold"] == 0.0
    assert tools["counter"](image=image, phrase="person", threshold=0.5).artifact["threshold"] == 0.5


def test_generator_continues_from_a_trained_export(generator_run, tmp_path):
    from toolvlm.finetune.train_generator import GeneratorConfig, GeneratorStage
    from toolvlm.tools.layout_diffusion import LayoutDiffusion

    export = generator_run / "export"
    sizes = dict(image_size=16, block_out_channels=[8, 16], norm_num_groups=4, prediction_type="v_prediction")
    stage = GeneratorStage(
        GeneratorConfig(run_dir=str(tmp_path), continue_from=str(export), scene_offset=7, **sizes)
    )
    trained = LayoutDiffusion.from_pretrained(export).unet.state_dict()
    for name, value in stage.model.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, trained[name].float())
    assert stage.data.offset == 3 * 10**7 + 7
    with pytest.raises(ValueError, match="another generator"):
        GeneratorStage(GeneratorConfig(run_dir=str(tmp_path), continue_from=str(export), image_size=16))
    guided = GeneratorStage(
        GeneratorConfig(run_dir=str(tmp_path), continue_from=str(export), guidance_scale=2.5, **sizes)
    )  # a sampling default is not the architecture: it may change, and the export carries the recipe's
    guided.export(tmp_path / "guided")
    assert LayoutDiffusion.from_pretrained(tmp_path / "guided").config.guidance_scale == 2.5
    assert "_name_or_path" not in json.loads((tmp_path / "guided" / "unet" / "config.json").read_text())
    assert guided.batch(0)["weights"] is None
    weighted = GeneratorStage(GeneratorConfig(run_dir=str(tmp_path), object_weight=3.0, **sizes))
    batch = weighted.batch(0)
    assert batch["weights"].shape == (16, 1, 16, 16) and batch["weights"].max() > 1.5
    assert torch.isfinite(weighted.loss(batch)[0])


class LinearStage:
    """A stage small enough to follow every weight: a 3 -> 1 linear layer fitting fixed targets."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 1)
        self.exported: dict[str, torch.Tensor] = {}

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(step))
        return x, x.sum(1, keepdim=True)

    def loss(self, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(self.model(x), y), {}

    def export(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.exported = {k: v.clone() for k, v in self.model.state_dict().items()}


def test_ema_is_the_warmed_up_average_of_the_weights_and_is_exported_and_resumed(tmp_path):
    from toolvlm.finetune.train_checkpoint import load_checkpoint_into
    from toolvlm.finetune.train_loop import TrainConfig, train

    def config(run: Path, steps: int, ema_decay: float = 0.5) -> TrainConfig:
        # a constant learning rate, so that an n-step run's weights are a longer run's after n steps
        return TrainConfig(run_dir=str(run), steps=steps, lr=0.1, warmup_steps=1, min_lr_ratio=1.0,
                           ema_decay=ema_decay, bf16=False)  # fmt: skip

    # runs without EMA give the weights after each step; the EMA follows them by hand
    weights = []
    for steps in range(1, 5):
        plain = LinearStage()
        train(plain, config(tmp_path / f"plain{steps}", steps, ema_decay=0.0))
        weights.append(plain.exported["weight"])
    average = weights[0]
    for n, w in enumerate(weights[1:], start=1):
        d = min(0.5, (1 + n) / (10 + n))
        average = average + (w - average) * (1 - d)
    straight = LinearStage()
    train(straight, config(tmp_path / "ema", 4))
    torch.testing.assert_close(straight.exported["weight"], average)
    assert not torch.allclose(average, weights[-1])  # the export is the average, not the last weights

    resumed = LinearStage()
    train(resumed, config(tmp_path / "resumed", 2))
    resumed = LinearStage()
    train(resumed, config(tmp_path / "resumed", 4))  # from the step-2 checkpoint, EMA included
    torch.testing.assert_close(resumed.exported["weight"], average)
    fresh = torch.nn.Linear(3, 1)
    assert load_checkpoint_into(fresh, tmp_path / "resumed") == 4
    torch.testing.assert_close(fresh.weight.detach(), average)


def test_worker_processes_build_the_same_batches_and_train_the_same_weights(tmp_path):
    """`workers` only moves batch building into processes: the weights after a run are bit-identical."""
    from toolvlm.finetune.train_loop import TrainConfig, train, train_device

    def run(name: str, workers: int) -> torch.Tensor:
        stage = LinearStage()
        config = TrainConfig(run_dir=str(tmp_path / name), steps=5, lr=0.1, warmup_steps=1, bf16=False,
                             workers=workers, device="auto")  # fmt: skip
        train(stage, config)
        return stage.exported["weight"]

    torch.testing.assert_close(run("in_process", 0), run("workers", 2), rtol=0, atol=0)
    assert train_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="device must be"):
        train_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            train_device("cuda")


def test_a_run_in_the_old_single_file_format_resumes_and_exports(tmp_path):
    """Runs written before the one checkpoint format (`checkpoint.pt`: model, optimizer, step) still resume."""
    from safetensors.torch import load_file

    from toolvlm.finetune.train_checkpoint import latest_checkpoint, load_checkpoint_into, load_training_state
    from toolvlm.finetune.train_loop import TrainConfig, optimizer_for, train

    def config(run: Path, steps: int) -> TrainConfig:
        return TrainConfig(run_dir=str(run), steps=steps, lr=0.1, warmup_steps=1, bf16=False, progress=False)

    straight = LinearStage()
    train(straight, config(tmp_path / "straight", 4))
    first = LinearStage()
    train(first, config(tmp_path / "first", 2))
    old = tmp_path / "old"
    old.mkdir()  # the same step-2 state, written as the old loop wrote it
    model = LinearStage().model
    assert load_checkpoint_into(model, tmp_path / "first") == 2
    optimizer = optimizer_for(model, config(old, 4))
    step2 = tmp_path / "first" / "checkpoints" / "step_0000002"
    optimizer.load_state_dict(load_training_state(step2 / "training.pt")["optimizer"])
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 2}, old / "checkpoint.pt"
    )
    assert latest_checkpoint(old) == old / "checkpoint.pt"
    assert load_file(step2 / "model.safetensors").keys() == model.state_dict().keys()
    resumed = LinearStage()
    result = train(resumed, config(old, 4))
    assert result.steps == 4 and len(result.losses) == 2  # steps 3 and 4 only
    torch.testing.assert_close(resumed.exported["weight"], straight.exported["weight"])
    assert latest_checkpoint(old).name == "step_0000004"  # and it continues in the one format
