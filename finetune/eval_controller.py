"""`toolvlm eval controller`: how well a controller picks tools and finishes tasks on held-out world scenes.

Scenes are drawn with a seed no training set uses, and the user's requests come from the held-out phrasings of
`build_world` (never trained on). Each scene gets one turn of one task, run through the agent loop with tools:

- SR_act: the first reply calls the expected tool, or no tool when the controller should answer itself;
- SR_args: the first call's arguments are right (image handle; phrase, up to articles and plural; changes);
- SR: the whole turn succeeds: right act, right arguments, and the task's answer is right;
- task scores: describe F1 of the object categories mentioned, grounding IoU >= 0.5 rate (over the boxes expected
  or given, whichever are more), exact counts, yes/no and colour answers, and generation with the requested count
  (the new image counted against the target).

Tools are the oracle tools of `world_oracle` (the real tool classes answering from the scene annotations) unless
real tools are given (an Assistant's, or a profile's with weights present). With oracle tools the task scores
measure the controller alone: the tools' own accuracy is not in them, and the result says so in `notes`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

from toolvlm.finetune.build_world import TASKS, Planner, Turn, planner_rng
from toolvlm.finetune.eval_world import f1
from toolvlm.finetune.world import Scene, sample_scene, scene_seed
from toolvlm.finetune.world_oracle import WorldOracle, category_of, normalize_phrase
from toolvlm.finetune.world_scene import CATEGORIES
from toolvlm.finetune.world_text import NUMBER_WORDS as WORLD_NUMBER_WORDS
from toolvlm.finetune.world_text import plural
from toolvlm.tools.base import ToolInputError
from toolvlm.tools.count_change import parse_change
from toolvlm.tools.imaging import iou

logger = logging.getLogger(__name__)

EVAL_SEED = 424242  # scenes of seed s are scene_seed(s, i): far from the training sets' seeds
BOX = re.compile(
    r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]"
)
HANDLE = re.compile(r"\bimg_\d+\b")
# number words a reply may use for a count: "zero" .. "twelve" (the world's captions spell counts up to 12)
NUMBER_WORDS = {"zero": 0, **{w: i for i, w in enumerate(WORLD_NUMBER_WORDS[1:13], 1)}}


def plan_eval(
    n: int, seed: int = EVAL_SEED, phrasing: str = "heldout", tasks: tuple[str, ...] = TASKS
) -> list[tuple[Scene, Turn]]:
    """n (scene, turn) pairs cycling through `tasks`; deterministic in `seed`."""
    unknown = set(tasks) - set(TASKS)
    if unknown or not tasks:
        raise ValueError(f"unknown tasks {sorted(unknown)}; tasks are {', '.join(TASKS)}")
    out = []
    i = 0
    while len(out) < n:
        scene_index = scene_seed(seed, i)
        scene = sample_scene(scene_index)
        planner = Planner(scene, planner_rng(scene_index), phrasing)
        for k in range(len(tasks)):
            turn = planner.plan(tasks[(len(out) + k) % len(tasks)])
            if turn is not None:
                out.append((scene, turn))
                break
        i += 1
    return out


# -- scoring ------------------------------------------------------------------------------------------------


def mentioned_categories(text: str) -> set[str]:
    """The world categories a text names (singular or plural, whole words)."""
    text = text.lower().replace("sunny", "sun")
    return {c for c in CATEGORIES if re.search(rf"\b({re.escape(c)}|{re.escape(plural(c))})\b", text)}


def answer_number(text: str) -> int | None:
    """The first number in an answer (digits or a small number word), image handles ignored."""
    text = HANDLE.sub("", text.lower())
    found = re.search(r"\b(\d+)\b|\b(" + "|".join(NUMBER_WORDS) + r")\b", text)
    if found is None:
        return 0 if re.search(r"\bno\b", text) else None
    return int(found.group(1)) if found.group(1) else NUMBER_WORDS[found.group(2)]


def answer_boxes(text: str) -> list[list[float]]:
    """Every [x0, y0, x1, y1] in an answer."""
    return [[float(v) for v in m.groups()] for m in BOX.finditer(text)]


def box_match_rate(predicted: list[list[float]], truth: list[list[float]]) -> float:
    """True boxes matched one-to-one (greedy) by a predicted box at IoU >= 0.5, over the larger of the two counts:
    an answer listing every box the tool found for 'the rightmost cloud' is not a grounding of it."""
    left = list(predicted)
    hits = 0
    for box in truth:
        best = max(left, key=lambda p: iou(p, box), default=None)
        if best is not None and iou(best, box) >= 0.5:
            hits += 1
            left.remove(best)
    return hits / max(len(truth), len(predicted)) if truth else float(not predicted)


def same_phrase(predicted: Any, expected: str) -> bool:
    """Phrases equal up to case, articles and (for a bare category) plural."""
    if not isinstance(predicted, str):
        return False
    a, b = normalize_phrase(predicted), normalize_phrase(expected)
    if a == b:
        return True
    category = category_of(b)
    return b in (category, plural(category or "")) and a in (category, plural(category or ""))


def arguments_match(call: Any, expected: dict[str, Any]) -> bool:
    """A call's arguments against the expected call: image handle, phrase, changes (others ignored)."""
    args, want = call.arguments, expected["arguments"]
    if args.get("image") != want.get("image"):
        return False
    if "phrase" in want and not same_phrase(args.get("phrase"), want["phrase"]):
        return False
    if "changes" in want:
        return same_changes(args.get("changes"), want["changes"])
    return True


def same_changes(got: Any, want: dict[str, Any]) -> bool:
    """Whether a call's `changes` mean the expected ones: the same categories, each change read the same way
    (2, 'x2' and 'twice as many people' are one change)."""
    if not isinstance(got, dict):
        return False
    try:
        read = {category_of(k) or k: parse_change(v) for k, v in got.items()}
    except ToolInputError:
        return False
    return read == {k: parse_change(v) for k, v in want.items()}


def score_turn(turn: Turn, steps: list[Any], answer: str, count_image: Any) -> dict[str, Any]:
    """Scores of one finished turn: act, args, task score and whole-turn success."""
    from toolvlm.agent.trajectory import AssistantStep, ToolStep

    replies = [s for s in steps if isinstance(s, AssistantStep)]
    first_calls = replies[0].calls if replies else []
    expected = turn.expected_calls
    act = (not first_calls and not (replies and replies[0].errors)) if not expected else (
        bool(first_calls) and first_calls[0].name == expected[0]["name"])  # fmt: skip
    args = act and (not expected or arguments_match(first_calls[0], expected[0]))
    truth, task = turn.truth, turn.task
    out: dict[str, Any] = {"task": task, "act": act, "args": args, "answer": answer[:400]}
    out["calls"] = [{"name": c.name, "arguments": c.arguments} for r in replies for c in r.calls]
    if task in ("describe", "caption"):
        out["f1"] = f1(mentioned_categories(answer), set(truth["categories"]))
        ok = out["f1"] >= 0.85
    elif task == "vqa":
        ok = re.search(rf"\b{truth['answer']}\b", answer.lower()) is not None
        out["vqa"] = ok
    elif task in ("ground", "refer", "ground_all"):
        out["iou50"] = box_match_rate(answer_boxes(answer), truth["boxes"])
        ok = out["iou50"] == 1.0
    elif task == "count":
        out["count"], out["answered"] = truth["count"], answer_number(answer)
        out["count_exact"] = out["answered"] == truth["count"]
        out["count_within10"] = (
            out["answered"] is not None and abs(out["answered"] - truth["count"]) <= 0.1 * truth["count"]
        )
        ok = out["count_exact"]
    else:  # generate: count the new image
        made = [s for s in steps if isinstance(s, ToolStep) and s.name == "generator" and s.images]
        got = count_image(made[-1].images[0], truth["phrase"]) if made else None
        target = truth["target"]
        out["generated_count"], out["target"] = got, target
        generator_calls = [c for c in out["calls"] if c["name"] == "generator"]
        out["changes_ok"] = bool(generator_calls) and same_changes(
            generator_calls[0]["arguments"].get("changes"), truth["changes"]
        )
        out["generate_ok"] = got is not None and abs(got - target) <= 0.1 * max(target, 1)
        ok = out["generate_ok"]
    out["ok"] = bool(ok)
    out["success"] = bool(act and args and ok)
    return out


# -- running ------------------------------------------------------------------------------------------------


def _controller_and_tools(target: Any) -> tuple[Any, dict[str, Any] | None]:
    """(controller, tools or None) from a VLM, a controller or an Assistant."""
    agent = getattr(target, "agent", None)
    if agent is not None:  # an Assistant
        return agent.controller, dict(agent.tools)
    if hasattr(target, "render") and hasattr(target, "engine"):  # a toolvlm VLM
        from toolvlm.agent.controllers import LocalVLMController

        return LocalVLMController(target), None
    return target, None


def evaluate_controller(
    vlm_or_assistant: Any,
    n: int = 64,
    seed: int = EVAL_SEED,
    phrasing: str = "heldout",
    tools: dict[str, Any] | None = None,
    agent_options: dict[str, Any] | None = None,
    tasks: tuple[str, ...] = TASKS,
) -> dict[str, Any]:
    """Scores of a controller (a VLM, a controller, or an Assistant with its tools) on n held-out turns of
    `tasks`."""
    from toolvlm.agent.loop import Agent, AgentConfig

    controller, own_tools = _controller_and_tools(vlm_or_assistant)
    tools = tools or own_tools
    oracle = WorldOracle()
    notes = []
    if tools is None:
        tools = oracle.tools()
        notes.append("tools: oracle (answers from the scene annotations); task scores measure the controller "
                     "alone, not the tool models")  # fmt: skip
    counter = oracle.tools()["counter"]

    def count_image(handle_image: Any, phrase: str) -> int | None:
        if oracle.scene_of(handle_image) is not None:  # an oracle-drawn image: exact
            return int(counter(image=handle_image, phrase=phrase).artifact["count"])
        if "counter" in tools:  # a real generator's image: the real counter's estimate
            return int(tools["counter"](image=handle_image, phrase=phrase).artifact.get("count", 0))
        return None

    results, seconds = [], defaultdict(list)
    for scene, turn in plan_eval(n, seed, phrasing, tasks):
        image = oracle.render(scene)
        reset = getattr(controller, "reset", None)
        if reset is not None:
            reset()
        agent = Agent(controller, tools, AgentConfig.from_dict(agent_options))
        started = time.perf_counter()
        answer_event = None
        for event in agent.run(turn.text, [image]):
            answer_event = event
        seconds[turn.task].append(time.perf_counter() - started)
        steps = agent.trajectory.current_turn()
        memory = agent.memory
        score = score_turn(turn, steps, answer_event.text, lambda h, p, m=memory: count_image(m.get(h), p))
        score["text"], score["answer"] = turn.text, answer_event.text
        results.append(score)
    return summarize(results, seconds, notes)


def summarize(
    results: list[dict[str, Any]], seconds: dict[str, list[float]], notes: list[str]
) -> dict[str, Any]:
    """Aggregate per-turn scores into the report."""

    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 4) if values else None

    with_calls = [r for r in results if r["task"] not in ("describe", "caption", "vqa")]
    counts = [r for r in results if r["task"] == "count"]
    report: dict[str, Any] = {
        "n": len(results),
        "SR_act": mean([float(r["act"]) for r in results]),
        "SR_args": mean([float(r["args"]) for r in with_calls]),
        "SR": mean([float(r["success"]) for r in results]),
        "describe_f1": mean([r["f1"] for r in results if "f1" in r]),
        "grounding_iou50": mean([r["iou50"] for r in results if "iou50" in r]),
        "count_exact": mean([float(r["count_exact"]) for r in results if "count_exact" in r]),
        # the targets' split: exact for counts up to 30, within 10% for crowds above
        "count_exact_le30": mean([float(r["count_exact"]) for r in counts if r["count"] <= 30]),
        "count_within10_gt30": mean([float(r["count_within10"]) for r in counts if r["count"] > 30]),
        "vqa_accuracy": mean([float(r["vqa"]) for r in results if "vqa" in r]),
        "generate_ok": mean([float(r["generate_ok"]) for r in results if "generate_ok" in r]),
        # the generator was asked for the requested change (whatever the generator then drew)
        "generate_changes_ok": mean([float(r["changes_ok"]) for r in results if "changes_ok" in r]),
        "by_task": {
            task: {
                "n": len(rs),
                "SR_act": mean([float(r["act"]) for r in rs]),
                "SR": mean([float(r["success"]) for r in rs]),
            }
            for task in TASKS
            if (rs := [r for r in results if r["task"] == task])
        },
        "median_turn_s": {task: round(statistics.median(v), 3) for task, v in seconds.items()},
        "notes": notes,
        "turns": results,
    }
    return report


# -- command line -------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `toolvlm eval controller`."""
    parser.add_argument("--model", help="a controller folder (saved VLM or adapter)")
    parser.add_argument(
        "--profile", help="a profile (name or path): its controller and tools (default: the default bundle)"
    )
    parser.add_argument("--n", type=int, default=64, help="held-out turns to run (default 64)")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="scene seed of the held-out set")
    parser.add_argument("--phrasing", choices=("heldout", "train"), default="heldout")
    parser.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help=f"comma-separated tasks to run (default all: {','.join(TASKS)})",
    )
    parser.add_argument(
        "--constrained",
        action="store_true",
        help="constrained decoding of tool calls (a profile may turn it on itself)",
    )
    parser.add_argument(
        "--prompts",
        help="the agent's prompt file (name in toolvlm.prompts or a YAML path; default: the profile's, else "
        "'agent'); a controller must be evaluated with the prompt it was trained with",
    )
    parser.add_argument(
        "--no-tool-images",
        action="store_true",
        help="name tool-made images without showing them (agent option)",
    )
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (per-turn details included)"
    )


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the scores."""
    from toolvlm.tools.base import MissingWeightsError

    if args.model and args.profile:
        print("toolvlm eval controller: give --model or --profile, not both", file=sys.stderr)
        return 2
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if set(tasks) - set(TASKS) or not tasks:
        print(f"toolvlm eval controller: --tasks takes some of {', '.join(TASKS)}", file=sys.stderr)
        return 2
    options: dict[str, Any] = {"constrained": True} if args.constrained else {}
    if args.prompts:
        options["prompts"] = args.prompts
    if args.no_tool_images:
        options["tool_images"] = False
    notes = []
    if not args.model:  # a profile, or the default bundle's
        from toolvlm.agent.assistant import Assistant

        target = Assistant.from_profile(args.profile)
        options = {**target.profile.agent, **options}
        try:
            for tool in target.agent.tools.values():
                if not getattr(tool, "is_setup", True):
                    tool.setup()
                    tool.is_setup = True
        except MissingWeightsError as err:
            notes.append(f"tool weights absent ({err}); tools replaced by the oracle")
            target = target.agent.controller
    else:
        from toolvlm.vlm import load_vlm

        target = load_vlm(args.model, dtype=args.dtype, merge=True)
    report = evaluate_controller(
        target, n=args.n, seed=args.seed, phrasing=args.phrasing, agent_options=options, tasks=tasks
    )
    report["notes"] = notes + report["notes"]
    if args.json:
        print(json.dumps(report))
        return 0
    for key in ("n", "SR_act", "SR_args", "SR", "describe_f1", "grounding_iou50", "count_exact",
                "count_exact_le30", "count_within10_gt30", "vqa_accuracy", "generate_ok",
                "generate_changes_ok"):  # fmt: skip
        print(f"{key:>16}: {report[key]}")
    for note in report["notes"]:
        print(f"note: {note}")
    return 0
