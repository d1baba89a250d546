"""A picture of what the in-house generator draws: held-out world layouts, the drawn scene above, samples below.

    python -m toolvlm.evaluation.sample_grid --generator bundle/generator --out docs/generator_samples.png

Column k is held-out scene k (eval seeds, never trained on): row 1 the world's own drawing, then one generated
sample per seed from that scene's layout (boxes and categories only; colours are the generator's choice). The
last column is the README check: a layout of 12 people and a tree (`default_boxes_for`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from toolvlm.evaluation.world_models import eval_scenes
from toolvlm.finetune.world_data import layout_of
from toolvlm.world import annotate, render_scene

CELL = 128
PAD = 4


def sample_grid(generator: str | Path, n: int = 6, seeds: int = 2, steps: int | None = None) -> Image.Image:
    """The grid image (n held-out scenes + the 12-people layout) x (drawn + `seeds` samples)."""
    from toolvlm.tools.layout_diffusion import LayoutDiffusion, default_boxes_for

    model = LayoutDiffusion.from_pretrained(generator)
    columns = []
    for scene in eval_scenes(n, offset=0):
        drawn = render_scene(scene)
        layout = layout_of(annotate(scene))
        columns.append((drawn, [model.generate(layout, seed=s, steps=steps) for s in range(seeds)]))
    twelve = default_boxes_for({"person": 12, "tree": 1}, model.config.image_size, seed=0)
    columns.append((None, [model.generate(twelve, seed=s, steps=steps) for s in range(seeds)]))
    rows = 1 + seeds
    grid = Image.new("RGB", (len(columns) * (CELL + PAD) + PAD, rows * (CELL + PAD) + PAD), "white")
    for c, (drawn, samples) in enumerate(columns):
        x = PAD + c * (CELL + PAD)
        if drawn is not None:
            grid.paste(drawn.resize((CELL, CELL), Image.BICUBIC), (x, PAD))
        else:
            ImageDraw.Draw(grid).text(
                (x + 8, PAD + CELL // 2 - 10), "layout:\n12 people\n+ a tree", fill="black"
            )
        for r, image in enumerate(samples, start=1):
            grid.paste(image.resize((CELL, CELL), Image.BICUBIC), (x, PAD + r * (CELL + PAD)))
    return grid


def main(argv: list[str] | None = None) -> int:
    """Write the grid PNG."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", required=True, help="an in-house generator folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sample_grid(args.generator, args.n, args.seeds, args.steps).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
