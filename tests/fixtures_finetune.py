"""Shared pieces of the fine-tuning tests: a small world dataset and recipes for tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fixtures_vlm import tiny_spec

from toolvlm.finetune.build_world import WorldDataConfig, build_world_dataset


@pytest.fixture(scope="session")
def world_jsonl(tmp_path_factory) -> Path:
    """12 world conversations with the short tool-less system prompt (tiny tokenizers make long prompts)."""
    return build_world_dataset(
        tmp_path_factory.mktemp("world"), WorldDataConfig(n_scenes=12, seed=3, tools=[])
    )


def write_recipe(folder: Path, lm_dir: Path, data: Path, **top: object) -> Path:
    """A YAML recipe training the tiny VLM on `data`, with top-level keys set."""
    recipe = {
        "model": {"spec": tiny_spec(lm_dir, pooling=2).to_dict()},
        "data": {"train": [str(data)], "max_length": 4096},
        "run_dir": str(folder / "out"),
        "pack_tokens": 4096,
        "bf16": False,
        "progress": False,
        "log_every": 1,
        "lr": 1e-2,
        "warmup_steps": 0,
        **top,
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
