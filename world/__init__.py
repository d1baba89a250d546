"""The procedurally drawn world: public API for sampling, rendering and annotating scenes, and writing datasets.

Scenes mirror the workflow's picture (people outdoors on grass under a sky, trees, a dog lying next to a frisbee)
and carry exact annotations. The parts live in `scene` (data model, specs, config), `sample`
(random scenes), `draw` (Pillow rendering) and `text` (relations, captions, referring expressions).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm.auto import tqdm

from toolvlm.world.draw import render_scene
from toolvlm.world.sample import sample_scene
from toolvlm.world.scene import (
    CATEGORIES,
    COLOURS,
    FAMILIES,
    Object,
    Scene,
    WorldConfig,
    scene_from_spec,
)
from toolvlm.world.text import (
    annotate,
    caption,
    paragraph,
    referring_expressions,
    relations,
    resolve_expression,
    vocabulary,
)

__all__ = [
    "CATEGORIES",
    "COLOURS",
    "FAMILIES",
    "Object",
    "Scene",
    "WorldConfig",
    "annotate",
    "caption",
    "paragraph",
    "referring_expressions",
    "relations",
    "render_scene",
    "resolve_expression",
    "sample_dataset",
    "sample_scene",
    "scene_from_spec",
    "scene_seed",
    "vocabulary",
]

logger = logging.getLogger(__name__)

ANNOTATIONS = "annotations.jsonl"
CONFIG = "world_config.json"


def scene_seed(seed: int, index: int) -> int:
    """The seed of scene `index` of the dataset drawn with `seed` (datasets of different seeds do not overlap)."""
    return seed * 1_000_003 + index


def sample_dataset(n: int, seed: int, out_dir: str | Path, config: WorldConfig | None = None) -> Path:
    """Write n scenes as PNG images plus `annotations.jsonl` (one `annotate` dict per line) into out_dir."""
    config = config or WorldConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    path = out / ANNOTATIONS
    with path.open("w") as f:
        for i in tqdm(range(n), desc="world scenes", unit="scene"):
            scene = sample_scene(scene_seed(seed, i), config)
            name = f"{i:06d}.png"
            render_scene(scene).save(out / name)
            record = {"image": name, "index": i, **annotate(scene)}
            f.write(json.dumps(record) + "\n")
    logger.info("wrote %d scenes to %s", n, out)
    return path
