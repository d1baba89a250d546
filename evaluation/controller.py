"""`toolvlm eval controller`: how well a controller picks tools and finishes tasks on held-out world scenes.

Scenes are drawn with a seed no training set uses, and the user's requests come from the held-out phrasings of
`build_world` (never trained on). Each scene gets one turn of one task, run through the agent loop with tools:

- SR_act: the first reply calls the expected tool, or no tool when the controller should answer itself;
- SR_args: the first call's arguments are right (image handle; phrase, up to articles and plural; changes);
- SR: the whole turn succeeds: right act, right arguments, and the task's answer is right;
- task scores: describe F1 of the object categories mentioned, grounding IoU >= 0.5 rate (over the boxes expected
  or given, whichever are more), exact counts, yes/no and colour answers, and generation with the requested count
  (the new image counted against the target).

Tools are the oracle tools of `world.oracle` (the real tool classes answering from the scene annotations) unless
real tools are given (an Assistant's, or a profile's with weights present). With oracle tools the task scores
measure the controller alone: the tools' own accuracy is not in them, and the result says so in `notes`.

Also: the hallucinated-category rate (descriptions naming a category the scene lacks), tool selection per
phrasing family (the turn called the tools its request needs and no others), and `out_of_domain`, the figures of
the out-of-domain check (`toolvlm.tools.domain`: real photographs flagged, world scenes falsely flagged; null
while that module is absent). With `--shift`, the same report on a second, shifted set: scenes of the
independent composer `shift_scenes` and requests of the phrasing families of `shift_phrasings`, neither ever
trained on; the JSON then has an `in_distribution` and a `shifted` block with the same keys.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import re
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

from tqdm.auto import tqdm

from toolvlm.evaluation.shift_phrasings import FAMILY_NAMES, SHIFT_SEED, family_of_task, plan_shift
from toolvlm.evaluation.world_models import f1
from toolvlm.finetune.build_world import TASKS, Planner, Turn, planner_rng
from toolvlm.tools.base import ToolInputError
from toolvlm.tools.count_change import parse_change
from toolvlm.tools.imaging import iou
from toolvlm.tools.number_words import first_number
from toolvlm.world import Scene, sample_scene, scene_seed
from toolvlm.world.oracle import WorldOracle, category_of, normalize_phrase
from toolvlm.world.scene import CATEGORIES
from toolvlm.world.text import plural

logger = logging.getLogger(__name__)

EVAL_SEED = 424242  # scenes of seed s are scene_seed(s, i): far from the training sets' seeds
BOX = re.compile(
    r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]"
)
HANDLE = re.compile(r"\bimg_\d+\b")
DOMAIN_MODULE = "toolvlm.tools.domain"  # the out-of-domain check (issue 28, item 3)
# the tools each task needs (all required) and may also use; anything else called is a wrong tool selection
TOOL_RULES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "describe": (frozenset(), frozenset({"captioner"})),
    "caption": (frozenset(), frozenset({"captioner"})),
    "vqa": (frozenset(), frozenset({"grounding", "counter"})),
    "ground": (frozenset({"grounding"}), frozenset()),
    "refer": (frozenset({"grounding"}), frozenset()),
    "ground_all": (frozenset({"grounding"}), frozenset()),
    "count": (frozenset({"counter"}), frozenset()),
    "generate": (frozenset({"generator"}), frozenset({"counter"})),
}
NEGATIVE = re.compile(r"\b(no|not|none|nothing|cannot|can't|couldn't|could not|don't|do not)\b")
POSITIVE = re.compile(r"\b(yes|yeah|there is|there are|i see|i can see|i found|found|here is|here are)\b")
# number words a reply may use for a count: "zero" .. "twelve" (the world's captions spell counts up to 12)


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
    found = first_number(text)
    if found is None:
        return 0 if re.search(r"\bno\b", text) else None
    return found


def presence_answer(text: str) -> bool | None:
    """Whether an answer says the thing is there (yes, 'I found ...', a box), is not (no, not, none), or None."""
    text = HANDLE.sub("", text.lower())
    if NEGATIVE.search(text):
        return False
    if POSITIVE.search(text) or BOX.search(text):
        return True
    return None


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
    truth, task = turn.truth, turn.task
    # the expected first call, or another first act the request allows (truth["alternatives"], shifted set)
    acceptable = turn.expected_calls[:1] + truth.get("alternatives", [])
    if not first_calls:
        act = not turn.expected_calls and not (replies and replies[0].errors)
        args = act
    else:
        wanted = [c for c in acceptable if c["name"] == first_calls[0].name]
        act = bool(wanted)
        args = act and arguments_match(first_calls[0], wanted[0])
    out: dict[str, Any] = {"task": task, "family": truth.get("family") or family_of_task(task)}
    out.update({"act": act, "args": args, "answer": answer[:400]})
    out["calls"] = [{"name": c.name, "arguments": c.arguments} for r in replies for c in r.calls]
    required, allowed = TOOL_RULES[task]
    called = {c["name"] for c in out["calls"]}
    out["tool_ok"] = required <= called <= required | allowed
    if task in ("describe", "caption"):
        mentioned = mentioned_categories(answer)
        out["f1"] = f1(mentioned, set(truth["categories"]))
        out["hallucinated"] = sorted(mentioned - set(truth["categories"]))
        ok = out["f1"] >= 0.85
    elif task == "vqa":
        if (
            "presence" in truth
        ):  # a yes/no detection request: a yes, no, or the boxes found, read as yes or no
            ok = presence_answer(answer) == truth["presence"]
        else:
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
    return evaluate_planned(vlm_or_assistant, plan_eval(n, seed, phrasing, tasks), tools, agent_options)


def evaluate_shifted(
    vlm_or_assistant: Any,
    n: int = 64,
    seed: int = SHIFT_SEED,
    tools: dict[str, Any] | None = None,
    agent_options: dict[str, Any] | None = None,
    families: tuple[str, ...] = FAMILY_NAMES,
) -> dict[str, Any]:
    """The same scores on n turns of the shifted set: composed scenes, phrasing families never trained on."""
    return evaluate_planned(vlm_or_assistant, plan_shift(n, seed, families=families), tools, agent_options)


def evaluate_planned(
    vlm_or_assistant: Any,
    planned: list[tuple[Scene, Turn]],
    tools: dict[str, Any] | None = None,
    agent_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run planned (scene, turn) pairs, one agent turn each, and summarise their scores."""
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

    results, seconds, images = [], defaultdict(list), []
    for scene, turn in tqdm(planned, desc="eval turns", unit="turn"):
        image = oracle.render(scene)
        images.append(image)
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
    report = summarize(results, seconds, notes)
    report["out_of_domain"] = out_of_domain_figures(images, getattr(vlm_or_assistant, "domain", None))
    return report


# -- out-of-domain figures (the hook) -----------------------------------------------------------------------

# scikit-image's bundled photographs (no download): real scenes, objects, microscopy, a telescope, textures
PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket", "moon", "coins", "clock", "brick", "grass",
          "gravel", "hubble_deep_field", "immunohistochemistry", "retina")  # fmt: skip


def real_photos() -> list[Any]:
    """scikit-image's bundled photographs as RGB PIL images ([] when scikit-image is not installed)."""
    if importlib.util.find_spec("skimage") is None:
        return []
    import numpy as np
    from PIL import Image
    from skimage import data

    out = []
    for name in PHOTOS:
        pixels = np.asarray(getattr(data, name)())
        out.append(Image.fromarray(pixels).convert("RGB"))
    return out


def out_of_domain_figures(world_images: list[Any], check: Any = None) -> dict[str, Any]:
    """The out-of-domain check's figures: the share of real photographs it flags (`real_photo_detection`) and of
    these world scenes (`world_false_alarms`). `check` is the evaluated Assistant's (`Assistant.domain`, a
    `toolvlm.tools.domain.DomainCheck`: `check(image).in_domain`); every figure is null, with a note, while
    `toolvlm.tools.domain` is absent or the target has no check."""
    figures: dict[str, Any] = {"real_photo_detection": None, "world_false_alarms": None, "n_photos": 0,
                               "n_world": len(world_images), "note": None}  # fmt: skip
    if importlib.util.find_spec(DOMAIN_MODULE) is None:
        figures["note"] = f"{DOMAIN_MODULE} absent: no out-of-domain check in this version"
        return figures
    if check is None:
        figures["note"] = (
            "the evaluated target has no out-of-domain check (a profile's `domain: {stats: FILE}`)"
        )
        return figures
    photos = real_photos()
    if photos:
        figures["real_photo_detection"] = round(sum(domain_flags(check, photos)) / len(photos), 4)
        figures["n_photos"] = len(photos)
    else:
        figures["note"] = "scikit-image not installed: no real photographs to check"
    if world_images:
        figures["world_false_alarms"] = round(sum(domain_flags(check, world_images)) / len(world_images), 4)
    return figures


def domain_flags(check: Any, images: list[Any]) -> list[bool]:
    """Whether the out-of-domain check flags each image (the one call into the check)."""
    return [not check.check(image).in_domain for image in images]


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
        # descriptions naming a category the scene lacks
        "hallucinated_category_rate": mean([float(bool(r["hallucinated"])) for r in results if "f1" in r]),
        "grounding_iou50": mean([r["iou50"] for r in results if "iou50" in r]),
        "count_exact": mean([float(r["count_exact"]) for r in results if "count_exact" in r]),
        # the targets' split: exact for counts up to 30, within 10% for crowds above
        "count_exact_le30": mean([float(r["count_exact"]) for r in counts if r["count"] <= 30]),
        "count_within10_gt30": mean([float(r["count_within10"]) for r in counts if r["count"] > 30]),
        "vqa_accuracy": mean([float(r["vqa"]) for r in results if "vqa" in r]),
        "generate_ok": mean([float(r["generate_ok"]) for r in results if "generate_ok" in r]),
        # the generator was asked for the requested change (whatever the generator then drew)
        "generate_changes_ok": mean([float(r["changes_ok"]) for r in results if "changes_ok" in r]),
        # per phrasing family: the turn called the tools its request needs and no others (null: no such turns)
        "tool_selection": {
            family: mean([float(r["tool_ok"]) for r in results if r["family"] == family])
            for family in FAMILY_NAMES
        },
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
    parser.add_argument(
        "--shift",
        action="store_true",
        help="also run the shifted set (composed scenes, phrasing families never trained on): one JSON with "
        "an in_distribution and a shifted block",
    )
    parser.add_argument("--shift-seed", type=int, default=SHIFT_SEED, help="scene seed of the shifted set")
    parser.add_argument(
        "--families",
        default=",".join(FAMILY_NAMES),
        help=f"phrasing families of the shifted set (default all: {','.join(FAMILY_NAMES)})",
    )
    parser.add_argument("--out", help="also write the JSON report to this file")
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
    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    if set(families) - set(FAMILY_NAMES) or not families:
        print(f"toolvlm eval controller: --families takes some of {', '.join(FAMILY_NAMES)}", file=sys.stderr)
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
    started = time.perf_counter()
    report = evaluate_controller(
        target, n=args.n, seed=args.seed, phrasing=args.phrasing, agent_options=options, tasks=tasks
    )
    report["notes"] = notes + report["notes"]
    if args.shift:
        shifted = evaluate_shifted(
            target, n=args.n, seed=args.shift_seed, agent_options=options, families=families
        )
        shifted["notes"] = notes + shifted["notes"]
        report = {
            "in_distribution": report,
            "shifted": shifted,
            "seconds": round(time.perf_counter() - started, 1),
        }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    if args.json:
        print(json.dumps(report))
        return 0
    print("\n".join(summary_lines(report)))
    return 0


SUMMARY_KEYS = ("n", "SR_act", "SR_args", "SR", "describe_f1", "hallucinated_category_rate", "grounding_iou50",
                "count_exact", "count_exact_le30", "count_within10_gt30", "vqa_accuracy", "generate_ok",
                "generate_changes_ok")  # fmt: skip


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The report as aligned lines: one column, or in-distribution and shifted side by side."""
    blocks = [report["in_distribution"], report["shifted"]] if "shifted" in report else [report]
    rows = [(key, [b[key] for b in blocks]) for key in SUMMARY_KEYS]
    rows += [(f"tools[{f}]", [b["tool_selection"][f] for b in blocks]) for f in FAMILY_NAMES]
    rows += [
        (f"ood {k}", [b["out_of_domain"][k] for b in blocks])
        for k in ("real_photo_detection", "world_false_alarms")
    ]
    lines = [f"{'':>26}  {'in-distribution':>15}  {'shifted':>15}"] if len(blocks) == 2 else []
    lines += [f"{key:>26}: " + "  ".join(f"{str(v):>15}" for v in values) for key, values in rows]
    notes = dict.fromkeys(n for b in blocks for n in [*b["notes"], b["out_of_domain"]["note"]] if n)
    return lines + [f"note: {note}" for note in notes]
