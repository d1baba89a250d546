"""World and COCO data builders: held-out phrasings kept apart, tool results equal to the annotations."""

from __future__ import annotations

import json
import re

import numpy as np
from PIL import Image

from toolvlm.evaluation.controller import answer_boxes, plan_eval
from toolvlm.finetune.build_coco import build_coco_dataset
from toolvlm.finetune.build_world import TEMPLATES, WorldDataConfig, build_world_dataset, world_example
from toolvlm.finetune.data import read_jsonl, system_prompt
from toolvlm.world.oracle import WorldOracle


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.sub(r"\\\{[a-z]\\\}", ".+", re.escape(template)) + "$")


def _user_texts(example) -> list[str]:
    out = []
    for m in example.messages:
        if m["role"] == "user":
            parts = (
                m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
            )
            out.append("".join(p.get("text", "") for p in parts if p["type"] == "text").split("\n")[-1])
    return out


def test_heldout_phrasings_are_disjoint_and_never_used_for_training():
    for kind, sets in TEMPLATES.items():
        assert not set(sets["train"]) & set(sets["heldout"]), kind
        assert sets["heldout"], f"{kind} has no held-out phrasings"
    heldout = [_pattern(t) for sets in TEMPLATES.values() for t in sets["heldout"]]
    train = [_pattern(t) for sets in TEMPLATES.values() for t in sets["train"]]
    for phrasing, own, other in (("train", train, heldout), ("heldout", heldout, train)):
        config = WorldDataConfig(phrasing=phrasing)
        for i in range(30):
            for text in _user_texts(world_example(i, config)):
                assert any(p.match(text) for p in own), text
                assert not any(p.match(text) for p in other), text


def _tool_text(message) -> str:
    return "".join(p.get("text", "") for p in message["content"] if p["type"] == "text")


def test_tool_results_match_the_annotations():
    config = WorldDataConfig(task_weights={"ground": 1, "refer": 1, "count": 1, "generate": 1})
    seen = set()
    for i in range(25):
        example = world_example(i, config)
        tools = [m for m in example.messages if m["role"] == "tool"]
        tasks = [t["task"] for t in example.meta["turns"]]
        seen.update(tasks)
        texts = iter(_tool_text(m) for m in tools)
        for turn in example.meta["turns"]:
            truth = turn["truth"]
            if turn["task"] in ("ground", "refer"):
                boxes = re.findall(r"\[(\d+), (\d+), (\d+), (\d+)\]", next(texts))
                assert [[int(v) for v in b] for b in boxes] == truth["boxes"]
            elif turn["task"] == "count":
                assert f"about {truth['count']} instance(s)" in next(texts)
            elif turn["task"] == "generate":
                assert f"about {truth['count']} instance(s)" in next(texts)
                assert f"{truth['phrase']} {truth['count']} -> {truth['target']}" in next(texts)
                assert f"about {truth['target']} instance(s)" in next(texts)
        assert all(not m.get("error") for m in tools)
        assert not any("unknown" in _tool_text(m) for m in tools)
    assert seen == {"ground", "refer", "count", "generate"}


def test_world_dataset_on_disk_renders_the_agents_system_prompt(tmp_path):
    path = build_world_dataset(tmp_path, WorldDataConfig(n_scenes=4))
    examples = read_jsonl(path)
    assert len(examples) == 4
    from toolvlm.agent.loop import Agent

    agent = Agent(None, WorldOracle().tools())
    assert examples[0].messages[0]["content"] == system_prompt() == agent.system_prompt()
    for ex in examples:
        images = ex.load_images()
        assert images[0].size == (224, 224)
        assert all(p.parent.name == "images" for p in ex.images)


def test_coco_annotations_become_grounding_and_counting_conversations(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(tmp_path / "imgs" / name)
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 80, "height": 60},
                   {"id": 2, "file_name": "b.jpg", "width": 80, "height": 60}],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 5, 10, 20], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [30, 5, 12, 22], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [50, 30, 20, 15], "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 1, "bbox": [0, 0, 40, 40], "iscrowd": 1},
            {"id": 5, "image_id": 2, "category_id": 2, "bbox": [5, 6, 30, 20], "iscrowd": 0},
        ],
    }  # fmt: skip
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    path = build_coco_dataset(tmp_path / "instances.json", tmp_path / "imgs", tmp_path / "out")
    examples = {ex.id: ex for ex in read_jsonl(path)}
    assert set(examples) == {"coco-a", "coco-b"}
    a, b = examples["coco-a"], examples["coco-b"]
    assert a.images[0].resolve() == (tmp_path / "imgs" / "a.jpg").resolve()  # the user's image stays put
    for ex in (a, b):
        texts = [_tool_text(m) for m in ex.messages if m["role"] == "tool"]
        for turn in ex.meta["turns"]:
            truth = turn["truth"]
            if turn["task"] == "count":
                assert any(f"about {truth['count']} instance(s) of '{truth['phrase']}'" in t for t in texts)
            else:
                boxes = [[round(v) for v in box] for box in truth["boxes"]]
                assert any(
                    all(str(box).replace(" ", "") in t.replace(" ", "") for box in boxes) for t in texts
                )
    # the crowd-annotated category of b is neither counted nor boxed
    assert all(t["truth"]["phrase"] == "dog" for t in b.meta["turns"])
    assert {"boxes": [[50, 30, 70, 45]], "phrase": "dog"} in [t["truth"] for t in a.meta["turns"]] or any(
        t["truth"]["phrase"] == "person" for t in a.meta["turns"]
    )


def test_noisy_tools_miscount_groups_and_the_answers_report_what_the_tools_said():
    config = WorldDataConfig(task_weights={"count": 1, "generate": 1, "refer": 1}, count_noise=1.0)
    off = 0
    for i in range(25):
        example = world_example(i, config)
        messages = example.messages
        said: list[int] = []  # the counts the counter reported in this turn
        for m in messages:
            if m["role"] == "user":
                said = []
            elif m["role"] == "tool" and "instance(s)" in _tool_text(m):
                said.append(int(re.search(r"about (\d+) instance", _tool_text(m)).group(1)))
            elif m["role"] == "assistant" and "<tool_call>" not in m["content"] and said:
                numbers = [int(n) for n in re.findall(r"\b\d+\b", re.sub(r"img_\d+", "", m["content"]))]
                assert numbers == said[::-1] or numbers == said or (said == [0] and "no" in m["content"]), (
                    m["content"], said)  # fmt: skip
        for turn in example.meta["turns"]:
            if turn["task"] == "count" and turn["truth"]["count"] >= 2:
                counted = [_tool_text(m) for m in messages if m["role"] == "tool"]
                off += not any(f"about {turn['truth']['count']} instance(s)" in t for t in counted)
            if turn["task"] == "refer":  # one object: never perturbed
                texts = [
                    _tool_text(m) for m in messages if m["role"] == "tool" and "box(es)" in _tool_text(m)
                ]
                assert any(str(turn["truth"]["boxes"][0]) in t for t in texts)
    assert off >= 3  # groups did come back miscounted


def test_noisy_oracle_gives_the_same_answer_for_the_same_image_and_phrase():
    from toolvlm.world import sample_scene

    scene = next(s for s in map(sample_scene, range(100)) if s.counts().get("person", 0) >= 10)
    oracle = WorldOracle(count_noise=1.0, seed=5)
    image = oracle.render(scene)
    detector = oracle.tools()["grounding"].detector
    first = detector.detect(image, ["person"], 0.2)
    assert [d.box for d in detector.detect(image, ["person"], 0.2)] == [d.box for d in first]
    assert len(first) != scene.counts()["person"]
    assert all(0 <= v <= 224 for d in first for v in d.box)
    exact = WorldOracle().tools()["grounding"].detector
    WorldOracle.register(exact.oracle, image, scene)
    assert len(exact.detect(image, ["person"], 0.2)) == scene.counts()["person"]


def test_generation_requests_stay_within_the_worlds_crowds():
    config = WorldDataConfig(task_weights={"generate": 1}, max_turns=1, phrasing="heldout")
    targets = [t["truth"]["target"] for i in range(60) for t in world_example(i, config).meta["turns"]]
    assert len(targets) >= 30 and max(targets) <= 65  # at most 60, or a few more than a crowd near 60


def test_generation_calls_pass_the_users_words_for_the_change():
    from toolvlm.tools.count_change import parse_change

    config = WorldDataConfig(task_weights={"generate": 1}, max_turns=1)
    checked = 0
    for i in range(20):
        example = world_example(i, config)
        for turn in example.meta["turns"]:
            generator = turn["truth"]["calls"][1]
            assert generator["name"] == "generator"
            ((category, words),) = generator["arguments"]["changes"].items()
            assert isinstance(words, str) and words in turn["text"]  # copied from the request, not translated
            assert parse_change(words) == parse_change(turn["truth"]["changes"][category])
            checked += 1
    assert checked >= 10


def test_missed_objects_are_searched_again_at_a_low_threshold_before_the_answer():
    config = WorldDataConfig(task_weights={"ground": 1, "refer": 1}, max_turns=2, miss_rate=1.0)
    retried = 0
    for i in range(12):
        example = world_example(i, config)
        calls = [
            json.loads(m["content"][len("<tool_call>") : -len("</tool_call>")])
            for m in example.messages
            if m["role"] == "assistant" and m["content"].startswith("<tool_call>")
        ]
        tools = [_tool_text(m) for m in example.messages if m["role"] == "tool"]
        answers = [
            m["content"]
            for m in example.messages
            if m["role"] == "assistant" and "<tool_call>" not in m["content"]
        ]
        for turn, answer in zip(example.meta["turns"], answers, strict=True):
            assert str(turn["truth"]["boxes"][0]) in answer  # found on the second search, answered with it
        for call, text in zip(calls, tools, strict=True):
            if "threshold" in call["arguments"]:  # the retry follows a search that found nothing
                assert call["arguments"]["threshold"] < 0.3 and text.startswith("found 1 box")
                retried += 1
            else:
                assert text.startswith("no box for") and "above threshold 0.3" in text
        assert len(calls) == 2 * len(answers)
    assert retried >= 12
    # without misses, one search per turn as before
    plain = world_example(0, WorldDataConfig(task_weights={"ground": 1, "refer": 1}, max_turns=2))
    assert sum(m["role"] == "tool" for m in plain.messages) == len(plain.meta["turns"])


def test_one_object_searches_that_also_find_others_are_answered_with_the_best_box_alone():
    config = WorldDataConfig(task_weights={"ground": 1, "refer": 1}, max_turns=2, distractor_rate=1.0)
    crowded = 0
    for i in range(16):
        example = world_example(i, config)
        tools = [_tool_text(m) for m in example.messages if m["role"] == "tool"]
        answers = [
            m["content"]
            for m in example.messages
            if m["role"] == "assistant" and "<tool_call>" not in m["content"]
        ]
        for turn, text, answer in zip(example.meta["turns"], tools, answers, strict=True):
            truth = turn["truth"]["boxes"][0]
            listed = answer_boxes(text)
            assert listed[0] == truth  # the target first: the best score
            assert answer_boxes(answer) == [truth]
            crowded += len(listed) > 1
    assert crowded >= 8  # most one-object searches find others of their kind too
    # without distractors, the search finds the target alone
    plain = world_example(0, WorldDataConfig(task_weights={"ground": 1, "refer": 1}, max_turns=2))
    texts = [_tool_text(m) for m in plain.messages if m["role"] == "tool"]
    assert all(len(answer_boxes(t)) == 1 for t in texts)


def test_presence_questions_are_balanced_and_answered_from_the_scene():
    yes = no = 0
    for scene, turn in plan_eval(120, tasks=("vqa",)):
        answer = turn.truth["answer"]
        if answer not in ("yes", "no"):
            continue  # a colour question
        category = re.search(r"\b(?:a|any) (\w+)", turn.text).group(1)
        assert (scene.counts().get(category, 0) > 0) == (answer == "yes")
        yes, no = yes + (answer == "yes"), no + (answer == "no")
    assert yes + no > 60 and 0.4 < yes / (yes + no) < 0.6
