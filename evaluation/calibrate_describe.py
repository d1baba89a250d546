"""Pick the per-category *describe* thresholds of a detector on training scenes, and ship them with the weights.

    toolvlm train calibrate-describe detector=bundle/detector [n=200] [fp_weight=3]

The `grounded` captioner (tools/grounded_caption.py) mentions a category when the detector's best box for it
clears the category's describe threshold. A false mention (a sun in a grass-only scene) reads worse than a missed
one, so each threshold minimises misses + `fp_weight` x false mentions over `n` scenes of the default mix and
`n` of the composed family (any place, size and background) of the *train* split, at scene indices no training
stage uses. The thresholds go into the detector's `toolvlm_detector.json` as `describe_thresholds` (with
`describe_threshold`, the median, for other phrases); the figures they reach on those scenes are logged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from toolvlm.finetune.world_data import scene_seed
from toolvlm.tools.detectors import CALIBRATION, make_detector
from toolvlm.tools.grounding import locate
from toolvlm.world import render_scene, sample_scene
from toolvlm.world.scene import CATEGORIES

log = logging.getLogger(__name__)

DESCRIBE_OFFSET = 6 * 10**7  # train-split scene indices far from every training stage's range
GRID = np.round(np.arange(0.05, 0.951, 0.01), 2)


def best_scores(detector, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(best score, present) arrays of shape (scenes, categories) over n default-mix and n composed scenes."""
    scenes = [sample_scene(scene_seed("train", DESCRIBE_OFFSET + i)) for i in range(n)]
    scenes += [
        sample_scene(scene_seed("train", DESCRIBE_OFFSET + n + i), family="composed") for i in range(n)
    ]
    contain = float(detector.calibration.get("count_contain", 1.0))
    scores = np.zeros((len(scenes), len(CATEGORIES)))
    present = np.zeros((len(scenes), len(CATEGORIES)), dtype=bool)
    for s, scene in enumerate(tqdm(scenes, desc="describe calibration", unit="scene")):
        counts = scene.counts()
        present[s] = [counts.get(c, 0) > 0 for c in CATEGORIES]
        located = locate(detector, render_scene(scene), list(CATEGORIES), float(GRID[0]), contain=contain)
        for score, label in zip(located.scores, located.labels, strict=True):
            k = CATEGORIES.index(label)
            scores[s, k] = max(scores[s, k], score)
    return scores, present


def pick(scores: np.ndarray, present: np.ndarray, fp_weight: float) -> float:
    """The threshold minimising misses + fp_weight x false mentions (ties: the lowest)."""
    costs = [np.sum(present & (scores < t)) + fp_weight * np.sum(~present & (scores >= t)) for t in GRID]
    return float(GRID[int(np.argmin(costs))])


def figures(scores: np.ndarray, present: np.ndarray, thresholds: np.ndarray) -> dict[str, float]:
    """Mean per-scene F1 of the mentioned categories and the share of scenes with a false mention."""
    said = scores >= thresholds
    tp = np.sum(said & present, 1)
    f1 = np.where(said.sum(1) + present.sum(1) > 0, 2 * tp / np.maximum(said.sum(1) + present.sum(1), 1), 1.0)
    return {
        "f1": round(float(f1.mean()), 4),
        "false_mention_rate": round(float(np.mean((said & ~present).any(1))), 4),
    }


@dataclass
class CalibrateDescribeConfig:
    """`toolvlm train calibrate-describe`: the detector folder and how the thresholds are picked."""

    detector: str = ""  # a detector folder (in-house OWL-ViT weights); the thresholds are written into it
    n: int = 200  # scenes of each kind (default mix, composed)
    fp_weight: float = 3.0  # cost of a false mention, in misses
    dry_run: bool = False  # report the thresholds, write nothing

    def __post_init__(self) -> None:
        if not self.detector:
            raise ValueError("detector: give the detector folder, e.g. detector=bundle/detector")


def calibrate_describe(config: CalibrateDescribeConfig) -> dict[str, Any]:
    """Calibrate the describe thresholds and write them into the detector folder's calibration file."""
    detector = make_detector("grounding", "inhouse", model=config.detector)
    detector.load("grounding")
    scores, present = best_scores(detector, config.n)
    chosen = np.array([pick(scores[:, k], present[:, k], config.fp_weight) for k in range(len(CATEGORIES))])
    before = figures(scores, present, np.full(len(CATEGORIES), detector.threshold("count", 0.3)))
    after = figures(scores, present, chosen)
    log.info("at the counting threshold: %s; at the describe thresholds: %s", before, after)
    thresholds = {c: float(t) for c, t in zip(CATEGORIES, chosen, strict=True)}
    if not config.dry_run:
        path = Path(config.detector) / CALIBRATION
        calibration = json.loads(path.read_text()) if path.is_file() else {}
        calibration.update(
            describe_thresholds=thresholds,
            describe_threshold=float(np.median(chosen)),
            describe_calibration=after | {"n_scenes": 2 * config.n, "fp_weight": config.fp_weight},
        )
        path.write_text(json.dumps(calibration, indent=2) + "\n")
    return {"describe_thresholds": thresholds, "count_threshold_figures": before, "figures": after}


if __name__ == "__main__":
    raise SystemExit(
        "python -m toolvlm.evaluation.calibrate_describe is now `toolvlm train calibrate-describe "
        "detector=DIR [key=value ...]`"
    )
