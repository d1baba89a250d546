"""Pick the counting score threshold of a trained detector on calibration scenes, and ship it with the weights.

    toolvlm train calibrate-detector detector=runs/detector/export [n=80] [views=2 view_iou=[0.3,0.2]]

The counter keeps the boxes of a phrase that score above a threshold and survive NMS; which threshold counts
best depends on the weights. On `n` mixed and `n // 2` crowd scenes of the *train* split (never the held-out
eval seeds), every present category is counted once at a low threshold, keeping the scores of the boxes NMS
keeps; since greedy NMS visits boxes best first, the count at a higher threshold t is the number of those scores
>= t. The threshold with the most exact counts (ties: the middle of the best run) is written to
`toolvlm_detector.json` as `count_threshold` (and `grounding_threshold`), which the tools read as their default.
With `own_thresholds=true`, a category with at least `min_samples` counts whose own best threshold counts at least
`min_gain` more of them right than the shared one gets it too (`count_thresholds`, under its singular and plural).
With `contain=[1,0.7]`, the counter's containment NMS (a box lying that much inside a better one is dropped;
1: off) is calibrated too: the scenes are counted once per value, each gets its best threshold, and the value
that counts the most right (the first listed on ties) is written as `count_contain` with its threshold (the
grounding threshold stays the one without containment, when 1 is tried).
`grounding_threshold=T` writes T for grounding instead: a referring expression with position words picks its
box among the candidates found for its search phrase, so grounding may want weaker candidates than counting.
With `views=2` the scenes are counted as a detector that looks twice counts (detectors.py), once per value of
`view_iou` (the IoU above which a box suppresses a weaker one of the other view), and the best is written with
`"views": 2`. What each option did to earlier bundles is in docs/RESULTS.md (Experiments).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from toolvlm.finetune.world_data import scene_seed
from toolvlm.world import annotate, render_scene, sample_scene
from toolvlm.world.text import plural

log = logging.getLogger(__name__)

CALIBRATION_OFFSET = 5 * 10**7  # train-split scene indices far from every training stage's range
CROWD_FAMILY = "crowd"
GRID = np.round(np.arange(0.05, 0.951, 0.01), 2)


def collect(counter, n: int) -> list[tuple[str, int, np.ndarray]]:
    """(category, true count, kept scores at a low threshold) per present category of n mixed + n//2 crowds."""
    scenes = [sample_scene(scene_seed("train", CALIBRATION_OFFSET + i)) for i in range(n)]
    scenes += [
        sample_scene(scene_seed("train", CALIBRATION_OFFSET + n + i), family=CROWD_FAMILY)
        for i in range(n // 2)
    ]
    samples = []
    for scene in tqdm(scenes, desc="calibration scenes", mininterval=10):
        image, counts = render_scene(scene), annotate(scene)["counts"]
        for category, truth in counts.items():
            if truth:
                found = counter.forward(image, category, threshold=float(GRID[0])).artifact
                samples.append((category, truth, np.asarray(found["scores"], dtype=np.float32)))
    return samples


def correct(truth: int, count: int) -> bool:
    """Exact up to 30, within 10% above."""
    return count == truth if truth <= 30 else abs(count - truth) <= 0.1 * truth


def best_threshold(samples: list[tuple[int, np.ndarray]]) -> tuple[float, float]:
    """(threshold, exact-count rate) maximising exact counts (within 10% above 30) over GRID."""
    rates = np.array([np.mean([correct(t, int((s >= g).sum())) for t, s in samples]) for g in GRID])
    best = np.flatnonzero(rates == rates.max())
    pick = best[len(best) // 2]
    return float(GRID[pick]), float(rates[pick])


def own_thresholds(
    samples: list[tuple[str, int, np.ndarray]], shared: float, min_samples: int, min_gain: int
) -> dict[str, float]:
    """Per-category thresholds (keyed by singular and plural) where one counts `min_gain` more right."""
    out: dict[str, float] = {}
    for category in sorted({c for c, _, _ in samples}):
        mine = [(t, s) for c, t, s in samples if c == category]
        if len(mine) < min_samples:
            continue
        threshold, rate = best_threshold(mine)
        before = sum(correct(t, int((s >= shared).sum())) for t, s in mine)
        if rate * len(mine) >= before + min_gain:
            out[category] = out[plural(category)] = threshold
    return out


@dataclass
class CalibrateDetectorConfig:
    """`toolvlm train calibrate-detector`: the detector folder and what to calibrate on it."""

    detector: str = ""  # the detector folder (an in-house OWL-ViT export); the calibration is written into it
    n: int = 80  # mixed scenes (plus n/2 crowds)
    own_thresholds: bool = False  # also a threshold per category where one counts better
    min_samples: int = 30  # counts a category needs for its own
    min_gain: int = 2  # more right counts it must give
    contain: list[float] = field(default_factory=lambda: [1.0])  # containment NMS values to try (1: off)
    grounding_threshold: float | None = None  # grounding's own (None: the counting one)
    views: int = 1  # views the detector looks at (2: also half a patch off)
    view_iou: list[float] = field(default_factory=lambda: [0.5])  # with two views, IoUs to try

    def __post_init__(self) -> None:
        if not self.detector:
            raise ValueError("detector: give the detector folder, e.g. detector=runs/detector/export")
        if self.views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {self.views!r}")
        if not self.contain or not self.view_iou:
            raise ValueError("contain and view_iou need at least one value each")


def calibrate_detector(config: CalibrateDetectorConfig) -> dict[str, Any]:
    """Calibrate and write toolvlm_detector.json into the detector folder; returns what was written."""
    from toolvlm.tools.counter import CounterTool
    from toolvlm.tools.detectors import CALIBRATION

    counter = CounterTool(backend="inhouse", model=config.detector, views=config.views)
    counter.setup()
    tried = []  # (rate, contain, view IoU, threshold, samples) per containment value and view IoU
    view_ious = [float(v) for v in config.view_iou] if config.views == 2 else [None]
    for contain in (float(c) for c in config.contain):
        for view_iou in view_ious:
            counter.contain = contain
            counter.detector.given_view_iou = view_iou
            samples = collect(counter, config.n)
            threshold, rate = best_threshold([(t, s) for _, t, s in samples])
            log.info(
                "contain %s, view IoU %s: threshold %s counts %.4f right", contain, view_iou, threshold, rate
            )
            tried.append((rate, contain, view_iou, threshold, samples))
    rate, contain, view_iou, threshold, samples = max(tried, key=lambda r: r[0])  # the first listed on ties
    # grounding keeps every box NMS keeps: its threshold is the one given, else the one found without containment
    grounding = config.grounding_threshold
    if grounding is None:
        grounding = next((t for _, c, v, t, _ in tried if c >= 1 and v == view_iou), threshold)
    own = (
        own_thresholds(samples, threshold, config.min_samples, config.min_gain)
        if config.own_thresholds
        else {}
    )
    threshold_of = {c: own.get(c, threshold) for c, _, _ in samples}
    rate_own = float(np.mean([correct(t, int((s >= threshold_of[c]).sum())) for c, t, s in samples]))
    written = {"count_threshold": threshold, "grounding_threshold": grounding, "count_contain": contain,
               "views": config.views, "view_iou": view_iou, "count_thresholds": own,
               "calibration_count_accuracy": round(rate, 4), "calibration_count_accuracy_own": round(rate_own, 4),
               "n_scenes": config.n}  # fmt: skip
    path = Path(config.detector, CALIBRATION)
    path.write_text(json.dumps(written, indent=2) + "\n")
    log.info("count threshold %s, contain %s, view IoU %s (exact/within-10%% counts %.3f on calibration scenes; "
             "with %d categories' own, %.3f) -> %s", threshold, contain, view_iou, rate, len(own) // 2, rate_own,
             path)  # fmt: skip
    return {**written, "path": str(path)}


if __name__ == "__main__":
    raise SystemExit(
        "python -m toolvlm.evaluation.calibrate_detector is now `toolvlm train calibrate-detector "
        "detector=DIR [key=value ...]`"
    )
