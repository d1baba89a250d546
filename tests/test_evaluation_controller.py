"""`eval_controller`: scripted controllers score SR 1.0 when perfect and lower when wrong; the scorers."""

from __future__ import annotations

import json

import pytest
from fixtures_vlm import tiny_lm_dir, tiny_spec  # noqa: F401

from toolvlm.agent.controllers import ScriptedController
from toolvlm.evaluation.controller import (
    answer_boxes,
    answer_number,
    box_match_rate,
    evaluate_controller,
    f1,
    mentioned_categories,
    plan_eval,
    same_phrase,
)
from toolvlm.finetune.build_world import IfNeeded

N = 16


def _script(n: int = N) -> list:
    """Every turn's scripted replies in order; the eval's oracle never misses, so no retry branch is taken."""
    return [r for _, turn in plan_eval(n) for r in turn.replies if not isinstance(r, IfNeeded)]


def _perfect(n: int = N) -> ScriptedController:
    return ScriptedController(_script(n))


def test_perfect_scripted_controller_scores_one():
    report = evaluate_controller(_perfect(), n=N)
    for key in ("SR_act", "SR_args", "SR", "describe_f1", "grounding_iou50", "count_exact", "vqa_accuracy",
                "generate_ok"):  # fmt: skip
        assert report[key] == 1.0, (key, [t for t in report["turns"] if not t["success"]])
    counts = [t["count"] for t in report["turns"] if t["task"] == "count"]
    assert report["count_exact_le30"] == (1.0 if min(counts) <= 30 else None)
    assert report["count_within10_gt30"] == (1.0 if max(counts) > 30 else None)
    assert set(report["by_task"]) == {
        "describe",
        "caption",
        "vqa",
        "ground",
        "refer",
        "ground_all",
        "count",
        "generate",
    }
    assert any("oracle" in note for note in report["notes"])
    assert report["hallucinated_category_rate"] == 0.0
    # the held-out phrasings are in-distribution families; the shifted set alone has the others
    assert report["tool_selection"] == {"describe": 1.0, "detect": 1.0, "ground": 1.0, "count": 1.0,
                                        "generate": 1.0, "conditional": None, "polite": None}  # fmt: skip
    assert set(report["out_of_domain"]) >= {"real_photo_detection", "world_false_alarms", "note"}
    json.dumps(report)  # serialisable for --json


def test_wrong_replies_score_lower():
    silent = evaluate_controller(ScriptedController([lambda m, i: "I am not sure."] * 100), n=N)
    assert silent["SR_act"] < 1.0 and silent["SR_args"] == 0.0 and silent["SR"] < 0.5
    assert silent["tool_selection"]["count"] == 0.0 and silent["tool_selection"]["describe"] == 1.0
    assert silent["hallucinated_category_rate"] == 0.0  # it names nothing
    swapped = [
        r.replace('"name": "counter"', '"name": "grounding"') if isinstance(r, str) else r for r in _script()
    ]
    report = evaluate_controller(ScriptedController(swapped + ["I am not sure."] * 50), n=N)
    assert report["SR_act"] < 1.0 and report["by_task"]["count"]["SR_act"] == 0.0
    assert report["tool_selection"]["count"] == 0.0 and report["tool_selection"]["ground"] == 1.0
    assert report["by_task"]["describe"]["SR"] == 1.0


def test_scorers():
    assert answer_number("There are 12 people (img_3).") == 12
    assert answer_number("I see three dogs.") == 3 and answer_number("There are no dogs.") == 0
    assert answer_boxes("at [1, 2, 30.5, 40] and [5,6,7,8]") == [[1, 2, 30.5, 40], [5, 6, 7, 8]]
    assert box_match_rate([[0, 0, 10, 10]], [[1, 1, 10, 10], [50, 50, 60, 60]]) == 0.5
    # extra boxes count against the answer: three clouds listed for "the rightmost cloud" is a third right
    assert box_match_rate([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], [[40, 0, 50, 10]]) == 1 / 3
    assert box_match_rate([[40, 0, 50, 10]], [[40, 0, 50, 10]]) == 1.0
    assert box_match_rate([], []) == 1.0 and box_match_rate([[0, 0, 1, 1]], []) == 0.0
    assert same_phrase("people", "person") and same_phrase("The red car", "red car")
    assert not same_phrase("the dog", "the red dog")
    assert mentioned_categories("Two people and a sunny sky; trees.") == {"person", "sun", "tree"}
    assert f1({"a", "b"}, {"a"}) == pytest.approx(2 / 3)


def test_eval_cli_runs_a_saved_tiny_controller(tmp_path, tiny_lm_dir, capsys):  # noqa: F811
    from toolvlm.evaluation import controller as eval_controller
    from toolvlm.vlm import build_vlm

    build_vlm(tiny_spec(tiny_lm_dir, pooling=2), dtype="float32").save(tmp_path / "ctrl")
    import argparse

    parser = argparse.ArgumentParser()
    eval_controller.add_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path / "ctrl"), "--n", "2", "--json", "--dtype", "float32"])
    assert eval_controller.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 2 and 0.0 <= report["SR_act"] <= 1.0


def test_a_subset_of_tasks_is_evaluated_and_each_turns_calls_are_kept():
    planned = plan_eval(4, tasks=("count", "generate"))
    assert [turn.task for _, turn in planned] == ["count", "generate", "count", "generate"]
    scripted = ScriptedController(
        [r for _, turn in planned for r in turn.replies if not isinstance(r, IfNeeded)]
    )
    report = evaluate_controller(scripted, n=4, tasks=("count", "generate"))
    assert set(report["by_task"]) == {"count", "generate"} and report["SR"] == 1.0
    generate = next(t for t in report["turns"] if t["task"] == "generate")
    assert [c["name"] for c in generate["calls"]] == ["counter", "generator", "counter"]
    with pytest.raises(ValueError, match="unknown tasks"):
        plan_eval(2, tasks=("dance",))
