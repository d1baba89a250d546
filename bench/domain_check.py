"""Benchmark (and fit) of the out-of-domain check (toolvlm.tools.domain): false alarms on world scenes it was not
fitted on, detection of real photographs it never saw.

    python bench/domain_check.py                 # measure the bundle's bundle/domain.safetensors
    python bench/domain_check.py --fit           # fit it first (world scenes only), then measure

Fitting uses world scenes alone, in three disjoint seed ranges: `--fit-scenes` scenes give the statistics and the
palette, `--calib-scenes` others the thresholds (the distance at their `--percentile`, times `--margin`; the
palette coverage at 100 - `--percentile`, times `--coverage-margin`), and the measurement uses a third range. Scenes vary as users make them: every family (a share composed: any background, all-grass half the time),
canvas sizes from 160 to 480 pixels (not only square) and a quarter saved as JPEG. Photographs are never used to
fit: they only measure detection.

Measured sets (false alarms: the share of world scenes called foreign; detection: the share of photos called so):
- world: the training mix; composed: the composed family only; grass_only: composed scenes on grass; spec: scenes
  from an independent composer written here (random categories, boxes anywhere at any size, any of the four
  backgrounds incl. all-sky, 0-30 objects, overlaps allowed); spec_jpeg: those saved at JPEG quality 60; jpeg:
  the training mix saved at JPEG quality 60; sizes: the training mix at 160x160, 320x240 and 512x512; shift and
  shift_jpeg: the shifted evaluation's composer (evaluation/shift_scenes.py), where this version has it.
  `far_*` is the share beyond the distance threshold alone (the palette test must then hold them in).
- photos_heldout: scikit-image's bundled photographs never looked at while designing the check (rocket, coins,
  moon, hubble_deep_field, immunohistochemistry, retina, grass, gravel, brick, clock, page, text, cell,
  microaneurysms, a face of lfw_subset), each whole and as four random crops of 40-90% of its sides;
  photos_dev: astronaut, coffee, chelsea and camera (looked at while designing), whole and as crops.

Last line: one JSON object with every figure and the threshold.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from toolvlm.bundle import DOMAIN_STATS, bundle_dir
from toolvlm.tools.domain import (
    DomainCheck,
    DomainStats,
    fit_palette,
    fit_stats,
    palette_coverage,
    set_threshold,
)
from toolvlm.world.draw import render_scene
from toolvlm.world.sample import sample_scene
from toolvlm.world.scene import (
    BACKGROUNDS,
    CATEGORIES,
    COLOURS,
    PALETTES,
    WorldConfig,
    scene_from_spec,
)

DEV_PHOTOS = ("astronaut", "coffee", "chelsea", "camera")
HELDOUT_PHOTOS = (
    "rocket", "coins", "moon", "hubble_deep_field", "immunohistochemistry", "retina", "grass", "gravel", "brick",
    "clock", "page", "text", "cell", "microaneurysms", "lfw_subset",
)  # fmt: skip
SIZES = ((224, 224), (224, 224), (160, 160), (320, 240), (240, 320), (256, 256), (480, 360), (384, 384))
FIT_SEEDS, CALIB_SEEDS, TEST_SEEDS = 0, 500_000, 900_000


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """The image after a JPEG save and load."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def varied_scenes(n: int, seed0: int, composed: float = 0.4, jpeg_share: float = 0.25) -> list[Image.Image]:
    """World scenes as users make them: every family, several canvas sizes, `jpeg_share` saved as JPEG."""
    rng = random.Random(seed0)
    images = []
    for i in range(n):
        width, height = rng.choice(SIZES)
        config = WorldConfig(width=width, height=height).with_composed(composed)
        image = render_scene(sample_scene(seed0 + i, config))
        images.append(jpeg(image, rng.randint(50, 95)) if rng.random() < jpeg_share else image)
    return images


def spec_scene(rng: random.Random) -> Image.Image:
    """A scene from an independent composer: any background, 0-30 objects of any category anywhere, any size."""
    width, height = rng.choice(SIZES)
    background = rng.choice(BACKGROUNDS)
    objects = []
    for _ in range(rng.randint(0, 30)):
        category = rng.choice(CATEGORIES)
        w = rng.uniform(0.03, 0.6) * width
        h = min(height, w * rng.uniform(0.4, 2.5))
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        spec = {"category": category, "box": [x0, y0, x0 + w, y0 + h]}
        if category in PALETTES:
            spec["color"] = rng.choice(list(COLOURS))
        if category == "dog":
            spec["pose"] = rng.choice(("standing", "lying"))
        objects.append(spec)
    horizon = rng.randint(0, height) if background in ("park", "street") else None
    spec = {"width": width, "height": height, "background": background, "objects": objects}
    if horizon is not None:
        spec["horizon"] = horizon
    return render_scene(scene_from_spec(spec))


def test_sets(n: int) -> dict[str, list[Image.Image]]:
    """The held-out world sets (seeds of none of the fitting ranges)."""
    s = TEST_SEEDS
    mix = WorldConfig()
    composed = WorldConfig(family_weights={"composed": 1.0})
    grass = []
    seed = s + 20_000
    while len(grass) < n:
        scene = sample_scene(seed, composed)
        seed += 1
        if scene.background == "grass":
            grass.append(render_scene(scene))
    rng = random.Random(s)
    sizes = [(160, 160), (320, 240), (512, 512)]
    spec = [spec_scene(rng) for _ in range(n)]
    sets = {
        "world": [render_scene(sample_scene(s + i, mix)) for i in range(n)],
        "composed": [render_scene(sample_scene(s + 10_000 + i, composed)) for i in range(n)],
        "grass_only": grass,
        "spec": spec,
        "spec_jpeg": [jpeg(image, 60) for image in spec],
        "jpeg": [jpeg(render_scene(sample_scene(s + 30_000 + i, mix)), 60) for i in range(n)],
        "sizes": [
            render_scene(sample_scene(s + 40_000 + i, WorldConfig(width=w, height=h)))
            for i, (w, h) in enumerate(sizes[i % 3] for i in range(n))
        ],
    }
    try:  # the shifted evaluation's composer (issue 28, item 1), where this version has it
        from toolvlm.evaluation.shift_scenes import compose_scene
    except ImportError:
        return sets
    sets["shift"] = [render_scene(compose_scene(s + 50_000 + i)) for i in range(n)]
    sets["shift_jpeg"] = [jpeg(image, 60) for image in sets["shift"]]
    return sets


def photo(name: str) -> Image.Image:
    """A photograph scikit-image ships (no download), as RGB."""
    import skimage.data

    array = getattr(skimage.data, name)()
    if name == "lfw_subset":
        array = (array[0] * 255).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def with_crops(images: list[Image.Image], rng: random.Random, crops: int = 4) -> list[Image.Image]:
    """Each image, then `crops` random crops of 40-90% of its sides."""
    out = []
    for image in images:
        out.append(image)
        for _ in range(crops):
            w, h = round(image.width * rng.uniform(0.4, 0.9)), round(image.height * rng.uniform(0.4, 0.9))
            x0, y0 = rng.randint(0, image.width - w), rng.randint(0, image.height - h)
            out.append(image.crop((x0, y0, x0 + w, y0 + h)))
    return out


def fit(args: argparse.Namespace, encoder: Path) -> DomainStats:
    """Statistics from `--fit-scenes` world scenes, threshold from `--calib-scenes` others."""
    probe = DomainCheck(DomainStats(args.feature, np.zeros(1), np.zeros((0, 1)), np.zeros(0), 1.0), encoder)
    t = time.time()
    features = probe.features(varied_scenes(args.fit_scenes, FIT_SEEDS), args.feature)
    logging.info("fit features of %d scenes in %.0f s", args.fit_scenes, time.time() - t)
    stats = fit_stats(features, args.feature, args.components, encoder=encoder.name)
    calibration = stats.distance(probe.features(varied_scenes(args.calib_scenes, CALIB_SEEDS), args.feature))
    set_threshold(stats, calibration, args.percentile, args.margin)
    # the palette from scenes as drawn (PNG), its threshold from other such scenes
    stats.palette = fit_palette(varied_scenes(args.fit_scenes, FIT_SEEDS, jpeg_share=0.0))
    coverage = [
        palette_coverage(im, stats.palette) for im in varied_scenes(args.calib_scenes, CALIB_SEEDS, 0.4, 0.0)
    ]
    stats.coverage_threshold = float(np.percentile(coverage, 100 - args.percentile) * args.coverage_margin)
    logging.info("palette: %d bins; calibration coverage min %.3f -> threshold %.3f", stats.palette.sum(),
                 min(coverage), stats.coverage_threshold)  # fmt: skip
    logging.info(
        "calibration distances: median %.2f, p99 %.2f, max %.2f -> threshold %.2f",
        np.median(calibration),
        np.percentile(calibration, 99),
        calibration.max(),
        stats.threshold,
    )
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stats", default=str(bundle_dir() / DOMAIN_STATS), help="the statistics file")
    parser.add_argument("--fit", action="store_true", help="fit the statistics first and write --stats")
    parser.add_argument("--feature", default="patch_mean", choices=("patch_mean", "projection"))
    parser.add_argument("--components", type=int, default=24)
    parser.add_argument("--fit-scenes", type=int, default=600)
    parser.add_argument("--calib-scenes", type=int, default=300)
    parser.add_argument("--percentile", type=float, default=99.5)
    parser.add_argument("--margin", type=float, default=1.15, help="threshold = percentile x margin")
    parser.add_argument("--coverage-margin", type=float, default=0.9, help="coverage threshold factor")
    parser.add_argument("--test-scenes", type=int, default=100, help="scenes per held-out world set")
    parser.add_argument("--seed", type=int, default=0, help="seed of the photo crops")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    import torch

    torch.set_num_threads(2)
    stats_path = Path(args.stats)
    if args.fit:
        stats = fit(args, stats_path.parent / "encoder")
        stats.save(stats_path)
        logging.info("wrote %s (%d bytes)", stats_path, stats_path.stat().st_size)
    check = DomainCheck.from_file(stats_path)
    figures: dict[str, object] = {
        "threshold": round(check.stats.threshold, 3),
        "feature": check.stats.feature,
    }
    worst: dict[str, float] = {}
    for name, images in test_sets(args.test_scenes).items():
        verdicts = check.verdicts(images)
        figures[f"false_alarms_{name}"] = round(float(np.mean([not v.in_domain for v in verdicts])), 4)
        figures[f"far_{name}"] = round(float(np.mean([v.distance > v.threshold for v in verdicts])), 4)
        worst[name] = round(min(v.coverage for v in verdicts), 3)
    rng = random.Random(args.seed)
    for name, names in (("photos_heldout", HELDOUT_PHOTOS), ("photos_dev", DEV_PHOTOS)):
        images = with_crops([photo(n) for n in names], rng)
        verdicts = check.verdicts(images)
        figures[f"detection_{name}"] = round(float(np.mean([not v.in_domain for v in verdicts])), 4)
        figures[f"n_{name}"] = len(images)
        whole = verdicts[::5]  # each photo whole comes first, then its four crops
        figures[f"missed_{name}"] = [n for n, v in zip(names, whole, strict=True) if v.in_domain]
        figures[f"min_distance_{name}"] = round(min(v.distance for v in verdicts), 2)
        worst[name] = round(max(v.coverage for v in verdicts), 3)
    figures["n_world_per_set"] = args.test_scenes
    figures["coverage_threshold"] = round(check.stats.coverage_threshold, 3)
    figures["min_world_coverage"] = {k: v for k, v in worst.items() if not k.startswith("photos")}
    figures["max_photo_coverage"] = {k: v for k, v in worst.items() if k.startswith("photos")}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
