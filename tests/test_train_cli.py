"""`toolvlm train STAGE`: every stage by name, tiny runs through the command line, errors exit 2 naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures_finetune import world_jsonl, write_recipe  # noqa: F401
from fixtures_vlm import tiny_lm_dir  # noqa: F401

from toolvlm.cli import main

TINY_ENCODER = [
    "steps=2", "image_size=32", "patch_size=16", "vision_width=32", "vision_layers=1", "vision_heads=2",
    "text_width=32", "text_layers=1", "text_heads=2", "projection_dim=32", "max_length=24", "tokenizer_scenes=10",
    "batch_size=2", "log_every=1", "save_every=1", "warmup_steps=1",
]  # fmt: skip


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_help_lists_every_stage(capsys):
    from toolvlm.finetune.train_stages import STAGES
    from toolvlm.train_cli import TASKS

    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    names = [*STAGES, *TASKS]
    assert {"controller", "encoder", "detector", "captioner", "generator", "generated-set", "calibrate-detector",
            "calibrate-describe", "export-bundle"} <= set(names)  # fmt: skip
    assert all(name in text for name in names)
    assert main(["--help"]) == 0
    assert " train " in capsys.readouterr().out


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cli") / "encoder"
    assert main(["train", "encoder", f"run_dir={run}", *TINY_ENCODER]) == 0
    return run


def test_encoder_trains_resumes_and_exports_through_the_cli(encoder_run, capsys):
    assert (encoder_run / "export" / "model.safetensors").is_file()
    assert sorted(p.name for p in (encoder_run / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]
    # the same command with steps=3 resumes at step 2 and runs one more step
    assert main(["train", "encoder", f"run_dir={encoder_run}", *TINY_ENCODER, "steps=3"]) == 0
    summary = last_json(capsys)
    assert summary["steps"] == 3 and summary["stage"] == "encoder"
    log = [json.loads(line) for line in (encoder_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all("loss" in r and "lr" in r for r in log)
    state = json.loads((encoder_run / "checkpoints" / "step_0000003" / "state.json").read_text())
    assert state["step"] == 3 and len(state["losses"]) == 3
    assert not (encoder_run / "checkpoints" / "step_0000001").exists()  # only the newest two are kept
    before = (encoder_run / "export" / "model.safetensors").stat().st_mtime_ns
    assert main(["train", "encoder", f"run_dir={encoder_run}", *TINY_ENCODER, "--export-only"]) == 0
    assert last_json(capsys)["steps"] == 3
    assert (encoder_run / "export" / "model.safetensors").stat().st_mtime_ns != before


def test_detector_and_its_calibration_through_the_cli(encoder_run, tmp_path, capsys, monkeypatch):
    from toolvlm.evaluation import calibrate_detector

    run = tmp_path / "detector"
    argv = ["train", "detector", f"run_dir={run}", f"init_from={encoder_run / 'export'}", "steps=1",
            "batch_size=2", "warmup_steps=1"]  # fmt: skip
    assert main(argv) == 0
    assert (run / "export" / "model.safetensors").is_file()
    monkeypatch.setattr(calibrate_detector, "GRID", calibrate_detector.GRID[::10])  # fewer thresholds to try
    assert main(["train", "calibrate-detector", f"detector={run / 'export'}", "n=2"]) == 0
    written = json.loads((run / "export" / "toolvlm_detector.json").read_text())
    assert written["n_scenes"] == 2 and 0 <= written["calibration_count_accuracy"] <= 1
    assert last_json(capsys)["count_threshold"] == written["count_threshold"]


def test_generator_through_the_cli(tmp_path, capsys):
    run = tmp_path / "generator"
    argv = ["train", "generator", f"run_dir={run}", "steps=1", "batch_size=2", "image_size=16",
            "block_out_channels=[8, 16]", "norm_num_groups=4", "warmup_steps=1"]  # fmt: skip
    assert main(argv) == 0
    assert last_json(capsys)["steps"] == 1 and (run / "export" / "unet").is_dir()


def test_controller_through_the_cli(tmp_path, tiny_lm_dir, world_jsonl, capsys):  # noqa: F811
    recipe = write_recipe(tmp_path, tiny_lm_dir, world_jsonl, stage=2, steps=2, pack_tokens=600)
    assert main(["train", "controller", str(recipe), "lora.r=4"]) == 0
    summary = last_json(capsys)
    assert summary["steps"] == 2 and (Path(summary["run"]) / "adapter" / "adapter_config.json").is_file()
    assert json.loads((Path(summary["run"]) / "result.json").read_text())["steps"] == 2


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["train", "encoder", "stepz=3"], "stepz"),
        (["train", "detector", "nonsense.yaml"], "nonsense.yaml"),
        (["train", "calibrate-detector", "n=5"], "detector"),
        (["train", "calibrate-detector", "detector=x", "views=3"], "views"),
        (["train", "generator", "schedule=wavy"], "schedule"),
        (["train", "export-bundle"], "name at least one part"),
        (["train", "controller"], "give a recipe"),
        (["train", "encoder", "mixed_precision=no"], "'mixed_precision' is now bf16"),
    ],
)
def test_bad_keys_and_values_exit_2_naming_them(argv, named, capsys):
    assert main(argv) == 2
    assert named in capsys.readouterr().err


def test_print_config_shows_the_resolved_task_config(capsys):
    assert main(["train", "calibrate-detector", "detector=d", "contain=[1,0.7]", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "contain:\n- 1.0\n- 0.7" in printed and "detector: d" in printed
