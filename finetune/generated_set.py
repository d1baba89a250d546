"""A stored set of the generator's own samples of world layouts, for training the detector on what it reads back.

The detector counts the people in images the generator drew ("double the people", then count again), but it
was trained on the world's crisp drawings; the generator's blurry 64 px objects are another domain. A sample
here is a training-split scene's layout drawn by the generator: its boxes and categories are exact targets
(the generator was told them), its colours are the generator's choice, so only category phrases are known.

    toolvlm train generated-set generator=bundle/generator n=900 out=runs/generated

Folder: `images/NNNNNN.png` (the generator's square output) and `samples.jsonl`, one line per image:
{"image", "index" (the train scene), "seed" (the sampling noise), "steps", "sampler"}. Writing resumes where
a previous run stopped (whole batches are appended). `GeneratedScenes` reads the folder as the detector's
dataset: the image resized to the scene's canvas as the generator tool does, then to the model's input, with the
scene's annotation (recomputed from its seed).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from toolvlm.finetune.world_data import layout_of, scene_seed, to_pixels
from toolvlm.world import annotate, sample_scene

log = logging.getLogger(__name__)

OFFSET = 500_000_000  # train scenes from here: apart from the detector's (10**7 on) and the generator's own
SAMPLES = "samples.jsonl"


def read_samples(folder: str | Path) -> list[dict[str, Any]]:
    """The sample records of a generated set (empty when the folder has none yet)."""
    path = Path(folder) / SAMPLES
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_generated_set(
    generator: str | Path,
    out: str | Path,
    n: int,
    steps: int | None = None,
    batch_size: int = 16,
    offset: int = OFFSET,
) -> int:
    """Draw the layouts of train scenes offset.. offset+n-1 with the generator; returns the samples written."""
    from toolvlm.tools.layout_diffusion import LayoutDiffusion

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    done = len(read_samples(out))
    if done >= n:
        return 0
    model = LayoutDiffusion.from_pretrained(generator)
    steps, sampler = steps or model.config.sample_steps, model.config.sampler
    written = 0
    with (out / SAMPLES).open("a") as records, tqdm(total=n, initial=done, desc="generated set") as bar:
        for start in range(done, n, batch_size):
            indices = list(range(start, min(n, start + batch_size)))
            layouts = [layout_of(annotate(sample_scene(scene_seed("train", offset + i)))) for i in indices]
            images = model.generate_many(layouts, seeds=indices, steps=steps)
            for i, image in zip(indices, images, strict=True):
                name = f"images/{i:06d}.png"
                image.save(out / name)
                record = {"image": name, "index": offset + i, "seed": i, "steps": steps, "sampler": sampler}
                records.write(json.dumps(record) + "\n")
            records.flush()
            written += len(indices)
            bar.update(len(indices))
    return written


@dataclass
class GeneratedScenes(Dataset):
    """A generated set as detector items: {'pixels', 'image', 'ann'}, like `WorldScenes`."""

    folder: str
    image_size: int = 224

    def __post_init__(self) -> None:
        self.samples = read_samples(self.folder)
        if not self.samples:
            raise ValueError(f"{self.folder} holds no generated samples ({SAMPLES} missing or empty)")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.samples[i]
        ann = annotate(sample_scene(scene_seed("train", record["index"])))
        with Image.open(Path(self.folder) / record["image"]) as stored:
            image = stored.convert("RGB").resize((ann["width"], ann["height"]), Image.Resampling.BICUBIC)
        return {"pixels": to_pixels(image, self.image_size), "image": image, "ann": ann}


@dataclass
class GeneratedSetConfig:
    """`toolvlm train generated-set`: which generator draws how many training layouts, into which folder."""

    out: str = ""  # the folder to write (resumed when it exists)
    generator: str = "bundle/generator"  # an in-house generator checkpoint folder
    n: int = 900  # samples in all
    steps: int = 0  # denoising steps (0: the generator's own)
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("out: give the folder to write, e.g. out=runs/generated")


def make_generated_set(config: GeneratedSetConfig) -> dict[str, Any]:
    """Write (or complete) a generated set; returns what was written."""
    written = write_generated_set(
        config.generator, config.out, config.n, config.steps or None, config.batch_size
    )
    return {"written": written, "total": len(read_samples(config.out)), "out": config.out}


if __name__ == "__main__":
    raise SystemExit(
        "python -m toolvlm.finetune.generated_set is now `toolvlm train generated-set out=DIR ...`"
    )
