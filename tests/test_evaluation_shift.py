"""The shifted evaluation set: the independent scene composer, the phrasing families, `--shift` end to end."""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import random
import re
import sys
import types

import pytest

from toolvlm.agent.controllers import ScriptedController
from toolvlm.evaluation import controller as eval_controller
from toolvlm.evaluation.controller import evaluate_shifted, out_of_domain_figures, presence_answer
from toolvlm.evaluation.shift_phrasings import CHANGES, FAMILIES, FAMILY_NAMES, plan_shift
from toolvlm.evaluation.shift_scenes import ShiftConfig, compose_scene, hidden_fractions
from toolvlm.finetune.build_world import PHRASINGS, IfNeeded, plan_conversation
from toolvlm.tools.count_change import parse_change
from toolvlm.tools.number_words import number_word
from toolvlm.world import annotate, sample_scene, scene_from_spec, scene_seed
from toolvlm.world.oracle import phrase_targets
from toolvlm.world.scene import CATEGORIES, COLOURS, SKY_CATEGORIES

SLOT = re.compile(r"\{\w+\}")


def _words(text: str) -> str:
    """Lower case, punctuation dropped, single spaces, padded so that `in` matches whole words."""
    return " " + " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()) + " "


@pytest.fixture(scope="module")
def scenes():
    return [compose_scene(i) for i in range(120)]


def test_composed_scenes_are_valid_deterministic_and_varied(scenes):
    config = ShiftConfig()
    for scene in scenes:
        rebuilt = scene_from_spec(scene.to_dict())  # every box inside the canvas, every colour the world's
        assert [o.box for o in rebuilt.objects] == [o.box for o in scene.objects]
        assert all(
            o.category in CATEGORIES and (o.color is None or o.color in COLOURS) for o in scene.objects
        )
        assert max(hidden_fractions(scene), default=0.0) <= config.max_hidden + 1e-9
    assert (
        compose_scene(7).to_dict() == scenes[7].to_dict()
        and compose_scene(8).to_dict() != scenes[7].to_dict()
    )
    people = [s.counts()["person"] for s in scenes]
    assert min(people) == 0 and max(people) >= 50 and max(people) <= 60
    assert len({p // 10 for p in people}) >= 6  # every band of ten from 0 to 59
    grass_only = [s for s in scenes if s.horizon == 0]
    assert len(grass_only) >= 15 and not any(
        o.category in SKY_CATEGORIES for s in grass_only for o in s.objects
    )
    assert {s.background for s in scenes} == {"grass", "park", "street", "sky"}
    # objects off a ground line: ground things whose feet are above the horizon, or anywhere on all-grass
    floating = [o for s in scenes if s.horizon > 0 for o in s.objects
                if o.category not in SKY_CATEGORIES and o.box[3] < s.horizon]  # fmt: skip
    assert len(floating) >= 20
    heights = [o.height for s in scenes for o in s.objects if o.category == "person"]
    assert min(heights) <= 14 and max(heights) >= 90  # tiny and large people
    overlapping = [s for s in scenes if max(hidden_fractions(s), default=0.0) >= 0.2]
    assert len(overlapping) >= 30  # occlusion is common, not a corner case


def test_composed_scenes_differ_from_the_training_sampler(scenes):
    """The training sampler puts people on a perspective ground line below the horizon; the composer does not."""
    world = [sample_scene(scene_seed(99, i)) for i in range(60)]
    world_grass = sum(s.horizon == 0 for s in world) / len(world)
    shift_grass = sum(s.horizon == 0 for s in scenes) / len(scenes)
    assert shift_grass > world_grass + 0.1
    above = [
        o
        for s in scenes
        for o in s.objects
        if o.category == "person" and s.horizon > 0 and o.box[3] < s.horizon
    ]
    world_above = [o for s in world for o in s.objects if o.category == "person" and o.box[3] < s.horizon]
    assert len(above) > 10 * max(1, len(world_above))


def _training_texts(n_scenes: int = 300) -> set[str]:
    """Every request build_world plans (both of its phrasing sets) and world_text's captions and expressions."""
    texts = set()
    for i in range(n_scenes):
        scene = sample_scene(scene_seed(11, i))
        notes = annotate(scene)
        texts |= {notes["caption"], notes["paragraph"], *(e["text"] for e in notes["referring"])}
        for phrasing in PHRASINGS:
            for k in range(3):
                turns = plan_conversation(scene, random.Random(f"{phrasing}/{i}/{k}"), phrasing, max_turns=3)
                texts |= {turn.text for turn in turns}
    return {_words(t) for t in texts}


def test_phrasing_families_are_disjoint_from_the_training_grammar():
    training = _training_texts()
    requests = [_words(turn.text) for _, turn in plan_shift(210)]
    assert not set(requests) & training
    # no run of four or more words a shifted template spells out appears in any training text
    runs = [_words(fragment) for family in FAMILIES.values() for templates in family.values()
            for template in templates for fragment in SLOT.split(template)]  # fmt: skip
    runs += [_words(fragment) for _, words in CHANGES for fragment in SLOT.split(words)]
    long_runs = [r for r in runs if len(r.split()) >= 4]
    assert len(long_runs) >= 30
    found = [r for r in long_runs if any(r in text for text in training)]
    assert not found, found


def test_change_words_read_back_to_their_values():
    for value, words in CHANGES:
        for k in (1, 3, 8):
            for number in (str(k), number_word(k)):
                text = words.replace("{n}", number).format(xs="dogs")
                want = parse_change(value.format(n=k) if isinstance(value, str) else value)
                assert parse_change(text) == want, (text, want)


def test_every_family_and_task_is_planned_with_resolvable_truth():
    planned = plan_shift(140)
    assert [t.text for _, t in planned] == [t.text for _, t in plan_shift(140)]  # deterministic
    seen = {(turn.truth["family"], turn.task) for _, turn in planned}
    for family, tasks in FAMILIES.items():
        for task in tasks:
            want = {"refer", "ground"} if task == "ground" else {task}
            assert want & {t for f, t in seen if f == family}, (family, task)
    assert {turn.truth["family"] for _, turn in planned} == set(FAMILY_NAMES)
    for scene, turn in planned:
        if turn.task in ("ground", "refer", "ground_all"):
            phrase = turn.expected_calls[0]["arguments"]["phrase"]
            boxes = [scene.objects[i].box for i in phrase_targets(scene, phrase)]
            assert sorted(boxes) == sorted(turn.truth["boxes"]), turn.text
        if turn.task == "count":
            assert turn.truth["count"] == scene.counts()[turn.truth["phrase"]]
        if turn.task == "generate":
            assert 0 <= turn.truth["target"] <= 60
    conditional = [t.text for _, t in planned if t.truth["family"] == "conditional"]
    assert all(re.search(r"edge|depth|segmentation|scribble|boundar", t) for t in conditional)
    assert any(t.text.startswith("I was wondering if you could") for _, t in planned)


def _perfect(planned):
    return ScriptedController([r for _, turn in planned for r in turn.replies])


def test_shifted_eval_scores_a_perfect_controller_one_and_a_parrot_low():
    n = 21
    report = evaluate_shifted(_perfect(plan_shift(n)), n=n)
    for key in ("SR_act", "SR_args", "describe_f1", "grounding_iou50", "count_exact", "vqa_accuracy"):
        assert report[key] == 1.0, (key, [t for t in report["turns"] if not t["success"]])
    assert report["hallucinated_category_rate"] == 0.0
    assert report["tool_selection"] == dict.fromkeys(FAMILY_NAMES, 1.0)
    assert report["n"] == n and report["out_of_domain"]["n_world"] == n
    # a controller that answers every request with one memorised paragraph and never calls a tool
    parrot = "A street with a grey road, a white car, the sun and two clouds; people in black shirts."
    bad = evaluate_shifted(ScriptedController([parrot] * 200), n=n)
    assert bad["hallucinated_category_rate"] > 0.5 and bad["describe_f1"] < 0.6
    assert bad["tool_selection"]["ground"] == 0.0 and bad["tool_selection"]["generate"] == 0.0
    assert bad["tool_selection"]["describe"] == 1.0 and bad["SR"] < 0.4
    json.dumps(report)


def test_a_yes_no_request_may_be_answered_directly_or_by_a_search():
    planned = [(s, t) for s, t in plan_shift(28) if t.task == "vqa"][:1]
    (scene, turn) = planned[0]
    category, present = turn.truth["category"], turn.truth["presence"]
    search = '<tool_call>{"name": "grounding", "arguments": {"image": "img_0", "phrase": "%s"}}</tool_call>'
    answer = f"I found a {category}." if present else f"I could not find any {category}."
    report = eval_controller.evaluate_planned(ScriptedController([search % category, answer]), planned)
    assert (
        report["SR_act"] == 1.0
        and report["vqa_accuracy"] == 1.0
        and report["tool_selection"]["detect"] == 1.0
    )
    wrong = "I found it." if not present else "There is none."
    report = eval_controller.evaluate_planned(ScriptedController([wrong]), planned)
    assert report["vqa_accuracy"] == 0.0
    assert presence_answer("No, there is no dog.") is False and presence_answer("Yes, two dogs.") is True
    assert presence_answer("Here it is: [1, 2, 3, 4]") is True and presence_answer("A meadow.") is None


def test_out_of_domain_hook_reports_null_without_the_module_or_a_check_and_figures_with_one(monkeypatch):
    flag_photos = types.SimpleNamespace(  # world scenes are 224 px, the photographs are not
        check=lambda image: types.SimpleNamespace(in_domain=image.size == (224, 224))
    )
    monkeypatch.setattr(eval_controller, "DOMAIN_MODULE", "toolvlm.tools.no_such_domain_check")
    figures = out_of_domain_figures([], flag_photos)
    assert figures["real_photo_detection"] is None and figures["world_false_alarms"] is None
    assert "absent" in figures["note"]
    fake = types.ModuleType("fake_domain")
    fake.__spec__ = importlib.machinery.ModuleSpec("fake_domain", None)
    monkeypatch.setitem(sys.modules, "fake_domain", fake)
    monkeypatch.setattr(eval_controller, "DOMAIN_MODULE", "fake_domain")
    assert out_of_domain_figures([], None)["real_photo_detection"] is None  # a target without a check
    pytest.importorskip("skimage")
    from toolvlm.world.draw import render_scene

    world = [render_scene(compose_scene(i)) for i in range(3)]
    figures = out_of_domain_figures(world, flag_photos)
    assert figures["real_photo_detection"] == 1.0 and figures["world_false_alarms"] == 0.0
    assert figures["n_photos"] >= 10 and figures["n_world"] == 3


def test_eval_cli_shift_writes_both_blocks_with_the_same_keys(tmp_path, monkeypatch, capsys):
    """`--shift` through the command line, the saved controller replaced by a scripted perfect one."""
    import toolvlm.vlm

    n = 3
    script = [r for _, t in eval_controller.plan_eval(n) for r in t.replies if not isinstance(r, IfNeeded)]
    script += [r for _, t in plan_shift(n) for r in t.replies]
    monkeypatch.setattr(toolvlm.vlm, "load_vlm", lambda *a, **k: ScriptedController(script))
    parser = argparse.ArgumentParser()
    eval_controller.add_arguments(parser)
    out = tmp_path / "shift.json"
    argv = ["--model", "ctrl", "--n", str(n), "--shift", "--json", "--out", str(out)]
    assert eval_controller.run(parser.parse_args(argv)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text())
    inside, shifted = report["in_distribution"], report["shifted"]
    assert set(inside) == set(shifted) and inside["n"] == shifted["n"] == n
    assert inside["SR_act"] == shifted["SR_act"] == 1.0
    assert inside["tool_selection"]["polite"] is None and shifted["tool_selection"]["polite"] is None
    assert [t["family"] for t in shifted["turns"]] == list(FAMILY_NAMES[:n])
    lines = eval_controller.summary_lines(report)
    assert "shifted" in lines[0] and any("tools[polite]" in line for line in lines)
    assert eval_controller.run(parser.parse_args([*argv, "--families", "dance"])) == 2
