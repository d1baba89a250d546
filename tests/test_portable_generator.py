"""The generator is a diffusers custom pipeline: plain diffusers loads the committed bundle/generator (and any
folder `LayoutDiffusion.save_pretrained` writes) without toolvlm, and draws what toolvlm draws."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from fixtures_portable import run_plain
from PIL import Image

from toolvlm.tools.layout import Layout
from toolvlm.tools.layout_diffusion import PIPELINE_FILE, LayoutDiffusion, LayoutDiffusionConfig

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle" / "generator"

PLAIN_PIPELINE = """
import json
from diffusers import DiffusionPipeline

folder, out, steps = sys.argv[1:]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
boxes, labels = [[4, 30, 14, 60], [30, 8, 60, 60]], ["people", "tree"]
pipe(boxes=boxes, labels=labels, seed=3, num_inference_steps=int(steps)).images[0].save(out + "/layout.png")
prompted = pipe("3 dogs and a tree", seed=0, num_inference_steps=int(steps)).images[0]
prompted.save(out + "/prompt.png")
print(json.dumps({"class": type(pipe).__name__, "components": [type(pipe.unet).__name__,
                  type(pipe.scheduler).__name__], "size": list(prompted.size)}))
"""


def _toolvlm_layout_image(folder: Path, steps: int) -> Image.Image:
    model = LayoutDiffusion.from_pretrained(folder)
    layout = Layout(64, 64, [[4, 30, 14, 60], [30, 8, 60, 60]], ["person", "tree"])
    return model.generate(layout, seed=3, steps=steps)


def test_bundle_generator_is_a_diffusers_pipeline(tmp_path):
    index = json.loads((BUNDLE / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "LayoutDiffusionPipeline"]
    assert index["layout"] == json.loads((BUNDLE / "layout.json").read_text())
    assert (BUNDLE / PIPELINE_FILE).read_text() == (ROOT / "tools" / "layout_pipeline.py").read_text()
    got = run_plain(PLAIN_PIPELINE, [str(BUNDLE), str(tmp_path), "4"], tmp_path)
    assert got["components"] == ["UNet2DModel", "DDPMScheduler"] and got["size"] == [64, 64]
    plain = np.asarray(Image.open(tmp_path / "layout.png"))
    assert np.array_equal(plain, np.asarray(_toolvlm_layout_image(BUNDLE, 4)))  # the same pixels as the tool
    assert np.asarray(Image.open(tmp_path / "prompt.png")).std() > 0


def test_saved_generator_is_a_diffusers_pipeline(tmp_path):
    config = LayoutDiffusionConfig(
        block_out_channels=[8, 16], norm_num_groups=4, image_size=64, sample_steps=2
    )
    LayoutDiffusion.build(config).save_pretrained(tmp_path / "generator")
    index = json.loads((tmp_path / "generator" / "model_index.json").read_text())
    assert index["layout"]["block_out_channels"] == [8, 16]
    got = run_plain(PLAIN_PIPELINE, [str(tmp_path / "generator"), str(tmp_path), "2"], tmp_path)
    assert got["class"] == "LayoutDiffusionPipeline"
    plain = np.asarray(Image.open(tmp_path / "layout.png"))
    assert np.array_equal(plain, np.asarray(_toolvlm_layout_image(tmp_path / "generator", 2)))
