"""Recipes: every packaged recipe loads with its config class; wrong types, unknown keys and bad overrides are
refused with the file and the key path; overrides are read as the file's YAML is."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from toolvlm.cli import main
from toolvlm.config import ConfigError, scalar
from toolvlm.finetune.train_config import ControllerConfig
from toolvlm.finetune.train_world import STAGES, stage_classes
from toolvlm.recipes import load_recipe, parse_overrides, save_config

ROOT = Path(__file__).parents[1]
RECIPES = sorted((ROOT / "finetune" / "recipes").glob("*.yaml")) + sorted(
    (ROOT / "bundle").glob("*/recipe.yaml")
)
STAGE2 = ROOT / "finetune" / "recipes" / "controller_stage2.yaml"


def config_class(path: Path) -> type:
    """The config class of a packaged recipe: a world stage's (world_<stage>*.yaml, bundle/<part>/), else the
    controller's ControllerConfig (what `toolvlm train` loads them with)."""
    name = path.parent.name if path.name == "recipe.yaml" else path.stem.removeprefix("world_")
    stage = next((s for s in STAGES if name == s or name.startswith(f"{s}_")), None)
    if path.stem.startswith("world_"):
        assert stage is not None, f"{path.name}: no stage of {list(STAGES)}"
    return stage_classes(stage)[0] if stage is not None else ControllerConfig


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_the_packaged_recipes_are_all_found():
    names = {p.parent.name if p.name == "recipe.yaml" else p.stem for p in RECIPES}
    assert {"controller_stage2", "world_detector", "world_generator", "controller", "detector"} <= names
    assert {config_class(p).__name__ for p in RECIPES} == {
        "ControllerConfig",
        "EncoderConfig",
        "DetectorConfig",
        "CaptionerConfig",
        "GeneratorConfig",
    }


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_packaged_recipe_loads_with_its_config_class(path, tmp_path):
    cls = config_class(path)
    config = load_recipe(path, cls)
    assert isinstance(config, cls)
    save_config(config, tmp_path / "again.yaml")  # what a run writes beside its weights reads back the same
    assert asdict(load_recipe(tmp_path / "again.yaml", cls)) == asdict(config)


def test_a_wrong_type_names_the_file_and_the_key(tmp_path):
    path = write(tmp_path, "model: {base: runs/s1}\nlora: {r: abc}\n")
    with pytest.raises(ConfigError) as caught:
        load_recipe(path, ControllerConfig)
    assert str(caught.value) == f"{path}: lora.r: expected an integer, got 'abc'"
    for text, expected in [
        ("lr: fast", "lr: expected a number, got 'fast'"),
        ("packing: yes", "packing: expected true or false, got 'yes'"),  # only true/false are booleans
        ("steps: 1.5", "steps: expected an integer, got 1.5"),
        ("run_dir: 7", "run_dir: expected a string, got 7"),
        ("lora: 8", "lora: expected a mapping, got 8"),
        ("data: {train: runs/x.jsonl}", "data.train: expected a list, got 'runs/x.jsonl'"),
        ("data: {world: {task_weights: {count: lots}}}", "data.world.task_weights.count: expected a number"),
        ("model: {spec: {vision: {image_size: 1.5}}}", "model.spec.vision.image_size: expected an integer"),
    ]:
        with pytest.raises(ConfigError, match="recipe.yaml: ") as caught:
            load_recipe(write(tmp_path, text + "\n"), ControllerConfig)
        assert expected in str(caught.value), text


def test_unknown_keys_are_refused_at_every_level(tmp_path):
    path = write(tmp_path, "model: {base: runs/s1}\nstep: 5\nlora: {alpah: 8}\nmodel_: {}\n")
    with pytest.raises(ConfigError) as caught:
        load_recipe(path, ControllerConfig)
    text = str(caught.value)
    assert text.startswith(f"{path}: 3 problems: ") and "\n" not in text
    assert "step: unknown key (did you mean 'steps'?); keys are: run_dir, steps," in text
    assert "lora.alpah: unknown key (did you mean 'alpha'?); keys are: r, alpha," in text
    assert "model_: unknown key" in text
    world = write(tmp_path, "steps: 3\nmodel: {vision_width: 64, colour: red}\n")
    with pytest.raises(ConfigError, match=r"model\.colour: unknown key; keys are: run_dir, steps"):
        load_recipe(world, stage_classes("detector")[0])  # DetectorConfig.model is an EncoderConfig


def test_overrides_are_read_as_yaml_and_validated_the_same_way(tmp_path):
    detector = stage_classes("detector")[0]
    config = load_recipe(None, detector, ["lr=1e-4", "focus=[bird,dog]", "all_negatives=true", "steps=8"])
    assert config.lr == 1e-4 and isinstance(config.lr, float)
    assert config.focus == ["bird", "dog"] and config.all_negatives is True and config.steps == 8
    trained = load_recipe(STAGE2, ControllerConfig, ["lora.r=8", "lr=1", "resume=no", "bf16=false"])
    assert trained.lora.r == 8 and trained.lr == 1.0 and isinstance(trained.lr, float)
    assert trained.resume == "no" and trained.bf16 is False  # `no` is text, as the field wants
    with pytest.raises(ConfigError) as caught:
        load_recipe(STAGE2, ControllerConfig, ["lora.r=abc"])
    assert str(caught.value) == (
        f"{STAGE2}: lora.r: expected an integer, got 'abc' (from the override 'lora.r=abc')"
    )
    with pytest.raises(
        ConfigError, match=r"lora\.rank: unknown key; keys are: r, alpha, .*override 'lora.rank=4'"
    ):
        load_recipe(STAGE2, ControllerConfig, ["lora.rank=4"])
    with pytest.raises(
        ConfigError, match=r"^overrides: focus: expected a list, got 'bird' \(from the override"
    ):
        load_recipe(None, detector, ["focus=bird"])


@pytest.mark.parametrize(
    "pair, expected",
    [
        ("lora.r", "override 'lora.r': expected key=value"),
        ("=3", "override '=3': expected key=value"),
        ("lora..r=3", "override 'lora..r=3': expected key=value"),
        ("focus=[bird", "override 'focus=[bird': the value is not valid YAML"),
        ("lora=3", None),  # a value where a mapping belongs: refused by the config, below
    ],
)
def test_a_bad_override_says_which(pair, expected):
    if expected is None:
        with pytest.raises(
            ConfigError, match=r"lora: expected a mapping, got 3 \(from the override 'lora=3'\)"
        ):
            load_recipe(STAGE2, ControllerConfig, [pair])
        return
    with pytest.raises(ConfigError) as caught:
        parse_overrides([pair])
    assert str(caught.value).startswith(expected)


def test_an_override_inside_a_value_is_refused():
    with pytest.raises(ConfigError, match=r"override 'a\.b\.c=2': sets a key inside 'b', which is a value"):
        parse_overrides(["a.b=1", "a.b.c=2"])


def test_the_config_classes_own_checks_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe\.yaml: stage must be 1 \(projector\) or 2"):
        load_recipe(write(tmp_path, "stage: 3\nmodel: {base: x}\n"), ControllerConfig)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(write(tmp_path, "lora: {r: [1\n"), ControllerConfig)
    with pytest.raises(ConfigError, match="expected a mapping of recipe keys, got list"):
        load_recipe(write(tmp_path, "- 1\n"), ControllerConfig)


def test_scalars_follow_yaml_1_2():
    assert scalar("1e-4") == 1e-4 and scalar("5E+4") == 5e4 and scalar("8") == 8 and scalar(".5") == 0.5
    assert scalar("true") is True and scalar("false") is False
    assert [scalar(v) for v in ("no", "off", "yes", "nan", "")] == ["no", "off", "yes", "nan", ""]
    assert scalar("[bird, dog]") == ["bird", "dog"] and scalar("{a: 1}") == {"a": 1}


def test_the_finetune_command_shows_one_line(capsys):
    assert main(["finetune", str(STAGE2), "lora.r=abc", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("toolvlm finetune: ")
    assert "controller_stage2.yaml: lora.r: expected an integer, got 'abc'" in err
    assert main(["finetune", str(STAGE2), "lora.r=8", "--print-config"]) == 0
    assert "  r: 8\n" in capsys.readouterr().out
