"""The generator end to end on tiny random Stable Diffusion, GLIGEN and in-house layout-diffusion checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolvlm.tools import MissingWeightsError, build_tools
from toolvlm.tools.generator import GeneratorTool
from toolvlm.tools.layout import Layout
from toolvlm.tools.layout_diffusion import LayoutDiffusion, rasterize

pytest_plugins = ["fixtures_tools"]  # fixtures: scene, tiny_models, scene_path


def _same(a, b) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_sd_text_to_image_is_seeded(tiny_models):
    tool = GeneratorTool(backend="sd", model=str(tiny_models("sd")), steps=2)
    out = tool(prompt="a person and a tree", seed=3, width=32, height=32)
    assert not out.error, out.content
    assert out.images[0].size == (32, 32)
    assert out.artifact["mode"] == "text" and out.artifact["seed"] == 3
    again = tool(prompt="a person and a tree", seed=3, width=32, height=32)
    other = tool(prompt="a person and a tree", seed=4, width=32, height=32)
    assert _same(out.images[0], again.images[0])
    assert not _same(out.images[0], other.images[0])


def test_sd_takes_a_layout_as_a_prompt(tiny_models):
    tool = GeneratorTool(backend="sd", model=str(tiny_models("sd")), steps=1)
    out = tool(boxes=[[0, 0, 10, 10], [10, 10, 20, 30]], phrases=["person", "person"], width=36, height=32)
    assert not out.error
    assert out.images[0].size == (32, 32)  # rounded down to a multiple of 8
    assert out.artifact["layout_used"] is False


def test_gligen_layout_to_image(tiny_models):
    tool = GeneratorTool(backend="gligen", model=str(tiny_models("gligen")), steps=2)
    out = tool(
        prompt="a park", boxes=[[2, 2, 16, 30], [18, 4, 30, 28]], phrases=["a person", "a tree"], seed=1
    )
    assert not out.error, out.content
    assert out.images[0].size == (32, 32)  # the checkpoint's default size
    assert out.artifact["mode"] == "layout" and out.artifact["layout_used"] is True
    again = tool(
        prompt="a park", boxes=[[2, 2, 16, 30], [18, 4, 30, 28]], phrases=["a person", "a tree"], seed=1
    )
    assert _same(out.images[0], again.images[0])
    text_only = tool(prompt="a park", steps=1)
    assert not text_only.error


def test_inhouse_modes(tiny_models):
    tool = GeneratorTool(backend="inhouse", model=str(tiny_models("inhouse_generator")), steps=2)
    text = tool(prompt="3 people and a tree")
    assert not text.error and text.images[0].size == (32, 32)
    layout = tool(boxes=[[0, 0, 30, 40], [30, 10, 60, 60]], phrases=["people", "tree"], width=64, height=64)
    assert not layout.error and layout.images[0].size == (64, 64)
    assert layout.artifact["layout"]["labels"] == ["person", "tree"]
    unknown = tool(boxes=[[0, 0, 10, 10]], phrases=["giraffe"])
    assert unknown.error and "person" in unknown.content  # lists what it can draw


def test_similar_image_doubles_people(scene, tiny_models):
    tools = build_tools(
        {
            "grounding": {"backend": "owlvit", "model": str(tiny_models("owlvit")), "threshold": 0.0},
            "generator": {"backend": "inhouse", "model": str(tiny_models("inhouse_generator")), "steps": 1},
        }
    )
    generator = tools["generator"]
    assert generator.grounding is tools["grounding"]
    reference = scene(96, 64)
    out = generator(image=reference, changes={"person": 2.0}, objects=["tree"], seed=5)
    assert not out.error, out.content
    before, after = out.artifact["counts_before"], out.artifact["counts_planned"]
    assert before["person"] > 0 and after["person"] == 2 * before["person"]
    assert after["tree"] == before["tree"]
    assert out.artifact["mode"] == "similar"
    assert len(out.artifact["layout"]["boxes"]) == sum(after.values())
    assert f"person {before['person']} -> {after['person']}" in out.content
    again = generator(image=reference, changes={"person": 2.0}, objects=["tree"], seed=5)
    assert _same(out.images[0], again.images[0])
    fewer = generator(image=reference, changes={"person": "-1"}, objects=["tree"], seed=5)
    assert fewer.artifact["counts_planned"]["person"] == before["person"] - 1
    assert out.artifact["counts_counted"] is None and "planned, not counted" in out.content  # no counter
    bad = generator(image=reference, changes={"person": "lots"})
    assert bad.error and "'+3'" in bad.content
    everything = generator(image=reference, changes={"people": 2.0}, seed=5)  # no objects: keep all it knows
    assert not everything.error, everything.content
    labels = set(everything.artifact["layout"]["labels"])
    assert labels & {"tree", "dog"}, labels  # not asked for, kept (the tiny detector finds no people)
    assert "person" not in everything.artifact["counts_before"]  # 'people' covers it: asked for once


class _FixedCounter:
    """A scripted counter: reports `counts` for whatever image it is given, and records the phrases asked."""

    def __init__(self, counts: dict[str, int]):
        self.counts, self.asked = counts, []

    def __call__(self, image, phrase):
        from toolvlm.tools.base import ToolOutput

        self.asked.append((image.size, phrase))
        per_label = {p.strip(): self.counts.get(p.strip(), 0) for p in phrase.split(";")}
        return ToolOutput(content="counted", artifact={"per_label": per_label})


def test_the_generated_image_is_recounted_and_the_text_reports_what_was_counted(scene, tiny_models):
    tools = build_tools(
        {
            "grounding": {"backend": "owlvit", "model": str(tiny_models("owlvit")), "threshold": 0.0},
            "counter": {},
            "generator": {"backend": "inhouse", "model": str(tiny_models("inhouse_generator")), "steps": 1},
        }
    )
    assert tools["generator"].counter is tools["counter"]  # build_tools links the counter
    generator = tools["generator"]
    out = generator(image=scene(96, 64), changes={"person": "+2"}, objects=["tree"], seed=5)
    assert not out.error, out.content
    counted = out.artifact["counts_counted"]
    assert set(counted) == set(out.artifact["counts_planned"]) == {"person", "tree"}
    direct = tools["counter"](image=out.images[0], phrase="person; tree").artifact["per_label"]
    assert counted == direct  # the figures are the counter's on the generated image, not the plan
    # a scripted counter that disagrees with the plan: its figures are reported, and the difference named
    generator.counter = _FixedCounter({"person": 1, "tree": 0})
    layout = generator(
        boxes=[[0, 0, 10, 20], [12, 0, 22, 20], [30, 5, 60, 60]], phrases=["person"] * 2 + ["tree"]
    )
    assert layout.artifact["counts_planned"] == {"person": 2, "tree": 1}
    assert layout.artifact["counts_counted"] == {"person": 1, "tree": 0}
    assert "counted in the new image: 1 person, 0 tree" in layout.content
    assert "differs from the plan for person, tree" in layout.content
    assert generator.counter.asked == [(layout.images[0].size, "person; tree")]


def test_count_caps_and_negative_factors_are_clear_input_errors(scene, tiny_models):
    tools = build_tools(
        {
            "grounding": {"backend": "owlvit", "model": str(tiny_models("owlvit")), "threshold": 0.0},
            "generator": {"backend": "inhouse", "model": str(tiny_models("inhouse_generator")), "steps": 1},
        }
    )
    generator = tools["generator"]
    negative = generator(image=scene(96, 64), changes={"person": -5})
    assert negative.error and "cannot be negative" in negative.content and "'-5'" in negative.content
    huge = generator(image=scene(96, 64), changes={"person": "=10000"})
    assert huge.error and "at most 200" in huge.content
    prompt = generator(prompt="ten thousand people")  # no hundreds in words: read as 10 and 1000
    assert not prompt.error or "at most 200" in prompt.content
    assert "at most 200" in generator(prompt="5000 people").content


def test_similar_image_needs_grounding(scene, tiny_models):
    tool = GeneratorTool(backend="inhouse", model=str(tiny_models("inhouse_generator")), steps=1)
    with pytest.raises(MissingWeightsError, match="grounding"):
        tool(image=scene(), changes={"person": 2})


def test_generator_bad_input(tiny_models):
    tool = GeneratorTool(backend="inhouse", model=str(tiny_models("inhouse_generator")), steps=1)
    assert tool().error
    assert "empty" in tool(prompt="   ").content
    mismatch = tool(boxes=[[0, 0, 10, 10]], phrases=["person", "tree"])
    assert mismatch.error and "one phrase per box" in mismatch.content
    outside = tool(boxes=[[100, 100, 120, 120]], phrases=["person"])
    assert outside.error and "outside" in outside.content
    assert tool(prompt="a tree", steps=0).error
    assert tool(prompt="a tree", seed="x").error


def test_rasterize_layout_channels(tiny_models):
    model = LayoutDiffusion.from_pretrained(tiny_models("inhouse_generator"))
    layout = Layout(64, 64, [[0, 0, 32, 32], [32, 32, 64, 64]], ["person", "dog"])
    channels = rasterize(layout, model.config)
    assert channels.shape == (4, 32, 32)  # 3 categories + the centre map
    assert channels[0, :16, :16].min() == 1 and channels[0, 16:, 16:].max() == 0
    assert channels[1].max() == 0  # no tree
    assert channels[2, 16:, 16:].min() == 1
    assert channels[3, 8, 8] == pytest.approx(1, abs=0.1) and channels[3].max() <= 1


@settings(
    max_examples=5, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**31 - 1), people=st.integers(0, 5))
def test_property_same_seed_same_image(tiny_models, seed, people):
    tool = GeneratorTool(backend="inhouse", model=str(tiny_models("inhouse_generator")), steps=1)
    prompt = f"{people} people and a dog"
    first = tool(prompt=prompt, seed=seed)
    second = tool(prompt=prompt, seed=seed)
    assert _same(first.images[0], second.images[0])


def test_v_prediction_trains_on_the_velocity_and_survives_save_and_load(tmp_path):
    import torch

    from toolvlm.tools.layout_diffusion import LayoutDiffusionConfig

    config = LayoutDiffusionConfig(
        categories=["person", "tree"], image_size=16, block_out_channels=[8, 16], norm_num_groups=4,
        prediction_type="v_prediction",
    )  # fmt: skip
    model = LayoutDiffusion.build(config)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    cond = model.conditioning(Layout(16, 16, [[2, 2, 8, 12]], ["person"])).expand(2, -1, -1, -1)
    loss = model.training_loss(pixels, cond, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)  # the same draws again: the velocity target by hand
    noise = torch.randn(pixels.shape, generator=generator)
    t = torch.randint(0, 1000, (2,), generator=generator)
    a = model.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    velocity = a.sqrt() * noise - (1 - a).sqrt() * pixels
    noisy = a.sqrt() * pixels + (1 - a).sqrt() * noise
    with torch.no_grad():
        predicted = model.unet(torch.cat([noisy, cond], dim=1), t).sample
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(predicted, velocity).item(), rel=1e-4)
    model.save_pretrained(tmp_path / "gen")
    loaded = LayoutDiffusion.from_pretrained(tmp_path / "gen")
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.generate(Layout(16, 16, [[2, 2, 8, 12]], ["person"]), steps=2).size == (16, 16)
    with pytest.raises(ValueError, match="prediction_type"):
        LayoutDiffusion.build(LayoutDiffusionConfig(prediction_type="x0"))


def test_cond_dropout_trains_on_the_null_layout(tmp_path):
    import torch

    from toolvlm.tools.layout_diffusion import LayoutDiffusionConfig

    config = LayoutDiffusionConfig(image_size=16, block_out_channels=[8, 16], norm_num_groups=4)
    model = LayoutDiffusion.build(config)
    pixels = torch.rand(3, 3, 16, 16) * 2 - 1
    cond = model.conditioning(Layout(16, 16, [[2, 2, 8, 12]], ["person"])).expand(3, -1, -1, -1)

    def loss(conditioning, dropout):
        return model.training_loss(pixels, conditioning, torch.Generator().manual_seed(3), dropout).item()

    null = torch.zeros_like(cond)
    assert loss(cond, 1.0) == pytest.approx(loss(null, 0.0), rel=1e-6)
    assert loss(cond, 0.0) != pytest.approx(loss(null, 0.0), rel=1e-6)
    assert loss(cond, 0.5) not in (pytest.approx(loss(null, 0.0)), pytest.approx(loss(cond, 0.0)))


def test_object_weights_give_small_objects_their_share_of_the_loss():
    import torch

    from toolvlm.tools.layout_diffusion import LayoutDiffusionConfig, object_weights

    config = LayoutDiffusionConfig(image_size=16, block_out_channels=[8, 16], norm_num_groups=4)
    layout = Layout(64, 64, [[4, 4, 8, 8], [20, 8, 60, 60]], ["person", "tree"])  # 1 x 1 and 10 x 13 at 16 px
    weights = object_weights(layout, config, strength=4.0)
    assert weights.shape == (1, 16, 16) and weights.mean() == pytest.approx(1.0, rel=1e-5)
    small, big, empty = weights[0, 1, 1], weights[0, 8, 10], weights[0, 15, 0]
    assert small == pytest.approx(5 * empty) and empty < big < small
    assert np.allclose(object_weights(Layout(64, 64), config, 4.0), 1.0)

    model = LayoutDiffusion.build(config)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    cond = model.conditioning(layout).expand(2, -1, -1, -1)

    def loss(w):
        return model.training_loss(pixels, cond, torch.Generator().manual_seed(1), weights=w).item()

    assert loss(torch.ones(2, 1, 16, 16)) == pytest.approx(loss(None), rel=1e-6)
    only_small = torch.zeros(2, 1, 16, 16)
    only_small[:, :, 1, 1] = 256.0  # all the weight on the small object's pixel
    assert loss(only_small) != pytest.approx(loss(None), rel=1e-3)


def test_guidance_scale_weighs_the_layout():
    from toolvlm.tools.layout_diffusion import LayoutDiffusionConfig

    config = LayoutDiffusionConfig(image_size=16, block_out_channels=[8, 16], norm_num_groups=4)
    model = LayoutDiffusion.build(config)
    people = Layout(16, 16, [[2, 2, 8, 12]], ["person"])
    tree = Layout(16, 16, [[4, 1, 14, 15]], ["tree"])

    def sample(layout, w):
        return np.asarray(model.generate(layout, seed=2, steps=3, guidance_scale=w), dtype=int)

    assert np.abs(sample(people, 0.0) - sample(tree, 0.0)).max() <= 1  # w = 0: the null layout alone
    assert np.abs(sample(people, 1.0) - sample(tree, 1.0)).max() > 1
    assert np.abs(sample(people, 3.0) - sample(people, 1.0)).max() > 1
    assert np.array_equal(sample(people, 1.0), np.asarray(model.generate(people, seed=2, steps=3)))
    model.config.guidance_scale = 3.0  # the config's default, as layout.json carries it
    assert np.array_equal(sample(people, 3.0), np.asarray(model.generate(people, seed=2, steps=3)))


def test_the_profile_guidance_reaches_the_inhouse_model(tiny_models):
    folder = str(tiny_models("inhouse_generator"))
    args = {"boxes": [[0, 0, 12, 30]], "phrases": ["person"], "width": 32, "height": 32, "seed": 1}
    plain = GeneratorTool(backend="inhouse", model=folder, steps=2)(**args).images[0]
    unguided = GeneratorTool(backend="inhouse", model=folder, steps=2, guidance_scale=0.0)
    assert not _same(plain, unguided(**args).images[0])
    other = unguided(**{**args, "boxes": [[10, 2, 30, 30]], "phrases": ["tree"]}).images[0]
    assert np.abs(np.asarray(other, dtype=int) - np.asarray(unguided(**args).images[0], dtype=int)).max() <= 1


def test_a_batch_of_samples_equals_the_samples_one_by_one():
    import numpy as np

    from toolvlm.tools.layout_diffusion import LayoutDiffusionConfig

    config = LayoutDiffusionConfig(image_size=16, block_out_channels=[8, 16], norm_num_groups=4)
    model = LayoutDiffusion.build(config)
    layouts = [Layout(16, 16, [[2, 2, 8, 12]], ["person"]), Layout(16, 16, [[4, 1, 14, 15]], ["tree"])]
    batch = model.generate_many(layouts, seeds=[5, 9], steps=3)
    for layout, seed, image in zip(layouts, [5, 9], batch, strict=True):
        alone = np.asarray(model.generate(layout, seed=seed, steps=3), dtype=int)
        assert np.abs(np.asarray(image, dtype=int) - alone).max() <= 1
    assert np.asarray(batch[0]).tolist() != np.asarray(batch[1]).tolist()
    with pytest.raises(ValueError, match="seeds"):
        model.generate_many(layouts, seeds=[1], steps=1)


def test_ancestral_sampling_is_seeded_per_image_and_the_config_gives_the_defaults(tmp_path):
    from toolvlm.tools.layout_diffusion import LayoutDiffusionConfig

    config = LayoutDiffusionConfig(image_size=16, block_out_channels=[8, 16], norm_num_groups=4)
    model = LayoutDiffusion.build(config)
    layouts = [Layout(16, 16, [[2, 2, 8, 12]], ["person"]), Layout(16, 16, [[4, 1, 14, 15]], ["tree"])]

    def pixels(image):
        return np.asarray(image, dtype=int)

    batch = model.generate_many(layouts, seeds=[5, 9], steps=4, sampler="ddpm")
    for layout, seed, image in zip(layouts, [5, 9], batch, strict=True):
        alone = model.generate(layout, seed=seed, steps=4, sampler="ddpm")
        assert np.abs(pixels(image) - pixels(alone)).max() <= 1  # each image draws its own noise
    deterministic = model.generate(layouts[0], seed=5, steps=4, sampler="ddim")
    assert np.abs(pixels(batch[0]) - pixels(deterministic)).max() > 1  # the steps add fresh noise
    assert not np.array_equal(
        pixels(batch[0]), pixels(model.generate(layouts[0], seed=6, steps=4, sampler="ddpm"))
    )

    model.config.sampler, model.config.sample_steps = "ddpm", 4  # layout.json's defaults
    assert np.array_equal(pixels(model.generate(layouts[0], seed=5)), pixels(batch[0]))
    model.save_pretrained(tmp_path / "gen")
    tool = GeneratorTool(backend="inhouse", model=str(tmp_path / "gen"))
    out = tool(boxes=[[2, 2, 8, 12]], phrases=["person"], width=16, height=16, seed=5)
    assert "4 steps" in out.content and np.array_equal(pixels(out.images[0]), pixels(batch[0]))
    assert "7 steps" in tool(prompt="a person", steps=7).content  # the call's steps win
    with pytest.raises(ValueError, match="sampler"):
        model.generate(layouts[0], sampler="euler")
    with pytest.raises(ValueError, match="sampler"):
        LayoutDiffusionConfig(sampler="euler")


def test_new_people_stand_below_the_horizon_and_are_taller_than_wide():
    import random

    from toolvlm.tools.layout import place_boxes

    layout = Layout(512, 512)
    place_boxes(layout, "person", 12, random.Random(0))
    place_boxes(layout, "sun", 1, random.Random(0))
    people = layout.boxes[:12]
    assert all(b[3] - b[1] > b[2] - b[0] for b in people)
    assert all(b[1] >= 0.45 * 512 - 1e-6 and b[3] <= 512 + 1e-6 for b in people)
    assert layout.boxes[12][3] <= 0.3 * 512 + 1e-6  # the sun in the sky
    place_boxes(layout, "person", 12, random.Random(1))  # more people: among the others, not in the sky
    assert all(b[1] >= min(p[1] for p in people) - 1e-6 for b in layout.boxes[13:])
    assert all(b[3] <= max(p[3] for p in people) + 1e-6 for b in layout.boxes[13:])
    place_boxes(layout, "kite", 1, random.Random(0))  # no prior: a square anywhere
    kite = layout.boxes[25]
    assert kite[2] - kite[0] == pytest.approx(kite[3] - kite[1])
