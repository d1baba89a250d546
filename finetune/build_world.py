"""Training conversations from the procedurally drawn world, in many paraphrases.

Each scene becomes one conversation of 1-3 user turns, each turn one task:

- `describe` / `caption`: the paragraph or the caption, answered by the controller itself;
- `vqa`: yes/no and colour questions, answered without a tool;
- `ground` / `refer`: "put a box around the tree" -> grounding call -> the answer gives the box (with the
  oracle's `miss_rate`, the first search sometimes finds nothing: the controller searches once more at a low
  threshold, then answers with the box, or that it found none; with `distractor_rate`, the search also finds
  others of the object's kind, scored lower, and the answer gives the best box alone);
- `ground_all`: "box all the dogs" -> grounding call -> every box;
- `count`: "how many people are there?" -> counter call -> the number;
- `generate`: "a similar image with double the people" -> counter -> generator with changes (the user's words
  for the change, passed on) -> counter on the new image to verify -> the answer with both counts (requests
  stay within the world's crowds of up to 60).

Answers with numbers or boxes copy what the tools reported. With `count_noise`, the oracle tools sometimes
miscount a group by a few, as real detectors do, so the controller learns to report the tools' figures.

The conversations are made by running the real agent loop (`toolvlm.agent`) with the controller's replies
scripted and the oracle tools of `world.oracle` (the real tool classes answering from the annotations), so tool
results, image handles, system prompt and message layout are exactly what the controller meets at inference.
User phrasings come in two disjoint sets: "train" and "heldout" (for `evaluation.controller`); the split never mixes.

This module plans and writes conversations; it knows nothing of models or training.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from toolvlm.finetune.data import TOOLSET, Example, system_prompt, write_jsonl
from toolvlm.finetune.paraphrase import request
from toolvlm.tools.count_change import target_count
from toolvlm.tools.number_words import number_word
from toolvlm.world import Scene, annotate, sample_scene, scene_seed
from toolvlm.world.oracle import WorldOracle
from toolvlm.world.scene import WorldConfig
from toolvlm.world.text import count_phrase, plural

logger = logging.getLogger(__name__)

PHRASINGS = ("train", "heldout")
TASKS = ("describe", "caption", "vqa", "ground", "refer", "ground_all", "count", "generate")

# {x}: an object phrase; {n}: a number. The held-out phrasings are never used for training.
TEMPLATES: dict[str, dict[str, list[str]]] = {
    "describe": {
        "train": ["What do you see in the image?", "Describe this picture.", "What is in this image?",
                  "Can you describe what the image shows?", "Tell me what you see.",
                  "Describe the scene in detail.", "What does this photo show?", "Give me a description of the image.",
                  "What's going on in this picture?", "Tell me about this image.", "What is shown here?",
                  "Walk me through the picture."],
        "heldout": ["What can you see here?", "Please describe the image for me.", "Explain what is in the picture."],
    },
    "caption": {
        "train": ["Describe the image in one sentence.", "Write a short caption for this image.",
                  "Caption this picture.", "Give me a one-line summary of the image.", "Give this image a caption.",
                  "Sum up the image in one sentence.", "Write a one-sentence description of the picture."],
        "heldout": ["Summarise the picture in a single sentence.", "What would be a good caption for this?"],
    },
    "exists": {
        "train": ["Is there a {x} in the picture?", "Do you see a {x}?", "Is there any {x} in this image?",
                  "Does the image contain a {x}?", "Can you see a {x}?", "Is there a {x} somewhere in the image?",
                  "Do you notice a {x} in the picture?"],
        "heldout": ["Can you spot a {x} anywhere?", "Is a {x} visible in the image?"],
    },
    "colour": {
        "train": ["What colour is the {x}?", "What color is the {x}?", "Which colour does the {x} have?",
                  "What's the colour of the {x}?", "Which color is the {x}?"],
        "heldout": ["Tell me the colour of the {x}.", "The {x} is what colour?"],
    },
    "ground": {
        "train": ["Put a box around {x}.", "Draw a bounding box around {x}.", "Generate a bounding box around {x}.",
                  "Find {x} and box it.", "Locate {x} in the image.", "Mark {x} with a box.", "Show me {x}.",
                  "Can you find {x}?", "Highlight {x} with a rectangle.", "Where exactly is {x}? Box it."],
        "heldout": ["Outline {x} with a bounding box.", "Please detect {x}.", "Give me the box of {x}.",
                    "Point out {x} with a box."],
    },
    "ground_all": {
        "train": ["Put boxes around all the {x}.", "Box every one of the {x}.", "Find all the {x}.",
                  "Draw bounding boxes around the {x}.", "Locate all {x} in the picture."],
        "heldout": ["Detect every {x} in the image.", "Give each of the {x} its own box."],
    },
    "count": {
        "train": ["How many {x} are there?", "Estimate the number of {x} in the image.", "Count the {x}.",
                  "How many {x} can you see?", "What is the number of {x}?", "Count how many {x} there are.",
                  "Tell me how many {x} are in the picture.", "How many {x} do you see?",
                  "Give me the number of {x}."],
        "heldout": ["How many {x} does the image show?", "Give me a count of the {x}.",
                    "I'd like to know the number of {x} here."],
    },
    "generate": {
        "train": ["Generate a similar image with {c}.", "Make a similar picture with {c}.",
                  "Create an image like this one but with {c}.", "Can you generate a version with {c}?",
                  "Draw a similar scene with {c}.", "Show me a similar image with {c}.",
                  "Make another version of this picture with {c}.", "Generate a similar image but with {c}.",
                  "I'd like a new image like this one, with {c}.", "Could you make this scene again with {c}?",
                  "Same scene, but with {c}, please.", "Create a copy of this picture that has {c}."],
        "heldout": ["Produce a picture similar to this one with {c}.", "Render a variant of this image with {c}."],
    },
}  # fmt: skip
# A change in counts, and the words for it ({x}: plural noun; {n}: a number, in digits or words). The controller
# passes the user's words on as the generator's `changes` value ({"person": "twice as many people"}): the tool
# reads them (tools/count_change.py), so the controller copies a span instead of translating it into a symbol,
# which it learns far better for wordings it never saw. The value is what the words mean, for scoring.
CHANGES: dict[str, list[tuple[Any, str]]] = {
    "train": [(2, "double the amount of {x}"), (2, "twice as many {x}"), (2, "two times the {x}"),
              (2, "the {x} doubled"), (3, "three times as many {x}"), (4, "four times as many {x}"),
              (0.5, "half the {x}"), (0.5, "half as many {x}"), ("+{n}", "{n} more {x}"),
              ("+{n}", "{n} additional {x}"), ("+{n}", "another {n} {x}"), ("-{n}", "{n} fewer {x}"),
              ("={n}", "exactly {n} {x}"), ("={n}", "only {n} {x}"), ("={n}", "{n} {x} in total")],
    "heldout": [(2, "double the {x}"), (3, "triple the number of {x}"), ("+{n}", "an extra {n} {x}")],
}  # fmt: skip
MAX_COUNT = 60  # the most objects of a category a request may ask for (the world draws crowds of up to 60)
YES_NO_CATEGORIES = (
    "dog",
    "tree",
    "car",
    "frisbee",
    "ball",
    "house",
    "bench",
    "bird",
    "flower",
    "cloud",
    "sun",
)
NEW_IMAGE = re.compile(r"New images: (img_\d+)")
COUNT_TEXT = re.compile(r"about (\d+) instance")  # a counter's result
FOUND_TEXT = re.compile(r"found (\d+) box")  # a grounding result
BOX_TEXT = re.compile(r"\[\d+(?:\.\d+)?(?:, \d+(?:\.\d+)?){3}\]")
NO_BOX_TEXT = "no box for"  # a grounding result that found nothing
NO_CAPTION_TEXT = "the captioner produced no text"  # a captioner result with nothing to say
RETRY_THRESHOLD = 0.1  # a search that found nothing is made once more at this threshold


@dataclass
class WorldDataConfig:
    """What `build_world_dataset` writes: how many scenes, which phrasings and tasks, which tools are listed."""

    n_scenes: int = 1000
    seed: int = 0
    phrasing: str = "train"
    task_weights: dict[str, float] = field(
        default_factory=lambda: {"describe": 1.0, "caption": 0.5, "vqa": 1.0, "ground": 1.0, "refer": 1.0,
                                 "ground_all": 0.5, "count": 1.5, "generate": 1.0}
    )  # fmt: skip
    max_turns: int = 3
    tools: list[str] = field(default_factory=lambda: list(TOOLSET))
    prompts: str = "agent"
    tool_images: bool = True  # show the images tools make (the agent option of that name must match)
    count_noise: float = 0.0  # chance that a group's boxes come back a few off (answers copy the tools)
    miss_rate: float = 0.0  # chance that one object is found only by a search at a low threshold
    distractor_rate: float = 0.0  # chance that a one-object search also finds others of its kind, weaker
    composed_share: float = (
        0.0  # scenes of the composed family (any place, size, background), the rest the mix
    )
    grammar_share: float = 0.0  # train requests from the paraphrase grammar (finetune/paraphrase.py)


@dataclass
class IfNeeded:
    """A scripted reply only one branch of a turn reaches (the answer after a retry); unused, it is dropped."""

    reply: Callable[[list[dict[str, Any]], list[Any]], str]

    def __call__(self, messages: list[dict[str, Any]], images: list[Any]) -> str:
        return self.reply(messages, images)


@dataclass
class Turn:
    """One planned user turn: the text, the scripted replies, the calls expected first, and the truth."""

    task: str
    text: str
    replies: list[str | Callable[[list[dict[str, Any]], list[Any]], str]]
    expected_calls: list[dict[str, Any]]  # the first reply's calls; [] when the controller answers itself
    truth: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """What evaluation needs (JSON): task, text, expected calls and truth."""
        return {
            "task": self.task,
            "text": self.text,
            "expected_calls": self.expected_calls,
            "truth": self.truth,
        }


def call(name: str, **arguments: Any) -> str:
    """A tool call in the protocol's text form."""
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def last_new_image(messages: list[dict[str, Any]]) -> str:
    """The handle of the newest image a tool reported in the conversation so far."""
    for message in reversed(messages):
        if message["role"] == "tool":
            text = _text(message)
            found = NEW_IMAGE.search(text)
            if found:
                return found.group(1)
    raise ValueError("no tool has made an image yet")


def tool_count(text: str, default: int) -> int:
    """The number a counter's result text reports ('about 12 instance(s) of ...'); `default` for another text
    (a scripted reply replayed after the wrong tool)."""
    found = COUNT_TEXT.search(text)
    return int(found.group(1)) if found else default


def _last_tool_text(messages: list[dict[str, Any]]) -> str:
    return _text(next(m for m in reversed(messages) if m["role"] == "tool"))


def _found_nothing(messages: list[dict[str, Any]]) -> bool:
    return _last_tool_text(messages).startswith(NO_BOX_TEXT)


def _text(message: dict[str, Any]) -> str:
    return "\n".join(p.get("text", "") for p in message["content"] if p.get("type") == "text")


def _box_text(box: list[float]) -> str:
    return "[" + ", ".join(str(round(v)) for v in box) + "]"


# -- planning -----------------------------------------------------------------------------------------------


class Planner:
    """Plans turns on one scene with one phrasing set."""

    def __init__(self, scene: Scene, rng: random.Random, phrasing: str = "train", grammar_share: float = 0.0):
        if phrasing not in PHRASINGS:
            raise ValueError(f"unknown phrasing set {phrasing!r}; sets are {PHRASINGS}")
        self.scene, self.rng, self.phrasing = scene, rng, phrasing
        self.grammar_share = grammar_share
        self.notes = annotate(scene)
        self.counts = {c: n for c, n in scene.counts().items()}

    def template(self, kind: str, **fill: Any) -> str:
        """A random phrasing of `kind` from this planner's set: for the train set, from the paraphrase grammar
        (`grammar_share` of the time) or the templates; never a held-out text."""
        if self.phrasing == "train" and self.rng.random() < self.grammar_share:
            heldout = {t.format(**fill) for t in TEMPLATES[kind]["heldout"]}
            return request(kind, self.rng, avoid=heldout, **fill)
        return self.rng.choice(TEMPLATES[kind][self.phrasing]).format(**fill)

    def plan(self, task: str) -> Turn | None:
        """A turn of `task` on this scene, or None when the scene does not allow it."""
        return getattr(self, f"_{task}")()

    def _describe(self) -> Turn:
        return self._captioned("describe", "The image shows {}")

    def _caption(self) -> Turn:
        return self._captioned("caption", "{}")

    def _captioned(self, task: str, answer: str) -> Turn:
        """A description from the captioner, whose text (what the detector found) the answer copies: a small
        controller's own paragraph names what its training scenes had, not what this image has."""
        present = sorted(c for c, n in self.counts.items() if n)
        args = {"image": "img_0"}

        def final(messages: list[dict[str, Any]], _images: list[Any]) -> str:
            text = _last_tool_text(messages)
            if text.startswith(NO_CAPTION_TEXT):
                return "I could not make out anything I know in this image."
            return answer.format(text[0].lower() + text[1:] if task == "describe" else text)

        return Turn(task, self.template(task), [call("captioner", **args), final],
                    [{"name": "captioner", "arguments": args}], {"categories": present})  # fmt: skip

    def _vqa(self) -> Turn:
        single = [o for o in self.scene.objects if o.color and self.counts[o.category] == 1]
        if single and self.rng.random() < 0.4:
            obj = self.rng.choice(single)
            noun = "person's shirt" if obj.category == "person" else obj.category
            answer = f"The {noun} is {obj.color}."
            return Turn("vqa", self.template("colour", x=noun), [answer], [], {"answer": obj.color})
        # half the questions ask about a category the scene has: drawn uniformly, most are absent from a scene,
        # and a controller trained on that answers "no" whatever it sees (balanced as in VQA v2)
        present = [c for c in YES_NO_CATEGORIES if self.counts[c]]
        absent = [c for c in YES_NO_CATEGORIES if not self.counts[c]]
        pool = present if present and (not absent or self.rng.random() < 0.5) else absent
        category = self.rng.choice(pool)
        n = self.counts[category]
        args = {"image": "img_0", "phrase": category}

        def answer(messages: list[dict[str, Any]], _images: list[Any]) -> str:
            found = FOUND_TEXT.search(_last_tool_text(messages))  # what the detector found, right or not
            k = int(found.group(1)) if found else 0
            if k == 0:
                return f"No, I found no {category} in the image."
            return f"Yes, there {'is' if k == 1 else 'are'} {count_phrase(k, category, plural(category))}."

        # presence is the detector's to judge (AP50 0.93 on the world), not the controller's 49 image tokens
        return Turn("vqa", self.template("exists", x=category), [call("grounding", **args), answer],
                    [{"name": "grounding", "arguments": args}], {"answer": "yes" if n else "no"})  # fmt: skip

    def _grounding_turn(self, task: str, expr: dict[str, Any]) -> Turn:
        phrase = expr["text"]
        args = {"image": "img_0", "phrase": phrase}
        box = expr["box"]
        name = phrase[4:] if phrase.startswith("the ") else phrase
        answer = f"Here is the {name}: {_box_text(box)}."

        def final(messages: list[dict[str, Any]], _images: list[Any]) -> str:
            if _found_nothing(messages):
                return f"I could not find the {name} in the image."
            return answer[:-1] + f" (drawn in {last_new_image(messages)})."

        def retry_or_final(messages: list[dict[str, Any]], images: list[Any]) -> str:
            if _found_nothing(messages):
                return call("grounding", **args, threshold=RETRY_THRESHOLD)
            return final(messages, images)

        replies = [call("grounding", **args), retry_or_final, IfNeeded(final)]
        return Turn(task, self.template("ground", x=phrase), replies,
                    [{"name": "grounding", "arguments": args}], {"boxes": [box], "phrase": phrase})  # fmt: skip

    def _ground(self) -> Turn | None:
        simple = [e for e in self.notes["referring"] if set(e["expr"]) <= {"category", "color"}]
        return self._grounding_turn("ground", self.rng.choice(simple)) if simple else None

    def _refer(self) -> Turn | None:
        rich = [e for e in self.notes["referring"] if set(e["expr"]) - {"category", "color"}]
        return self._grounding_turn("refer", self.rng.choice(rich)) if rich else None

    def _ground_all(self) -> Turn | None:
        groups = [c for c, n in self.counts.items() if 2 <= n <= 6]
        if not groups:
            return None
        category = self.rng.choice(groups)
        boxes = [o.box for o in self.scene.objects if o.category == category]
        args = {"image": "img_0", "phrase": category}

        def final(messages: list[dict[str, Any]], _images: list[Any]) -> str:
            text = _last_tool_text(messages)  # what the tool saw, right or not
            total = FOUND_TEXT.search(text)
            if total is None:
                return f"I found no {plural(category)}."
            listed = ", ".join(m.group(0) for m in BOX_TEXT.finditer(text))
            k = int(total.group(1))
            found = f"{k} {category if k == 1 else plural(category)}"
            return f"I found {found}: {listed} (drawn in {last_new_image(messages)})."

        text = self.template("ground_all", x=plural(category))
        return Turn("ground_all", text, [call("grounding", **args), final],
                    [{"name": "grounding", "arguments": args}], {"boxes": boxes, "phrase": category})  # fmt: skip

    def _count(self) -> Turn:
        present = [c for c, n in self.counts.items() if n and c not in ("sun",)]
        category = (
            "person"
            if "person" in present and self.rng.random() < 0.6
            else self.rng.choice(present or ["person"])
        )
        n = self.counts[category]
        args = {"image": "img_0", "phrase": category}
        words = plural(category)

        def answer(messages: list[dict[str, Any]], _images: list[Any]) -> str:
            said = tool_count(_last_tool_text(messages), n)  # the counter's number, right or not
            if said == 0:
                return f"There are no {words}."
            return f"There is 1 {category}." if said == 1 else f"There are {said} {words}."

        return Turn("count", self.template("count", x=words), [call("counter", **args), answer],
                    [{"name": "counter", "arguments": args}], {"count": n, "phrase": category})  # fmt: skip

    def _generate(self) -> Turn | None:
        candidates = [c for c in ("person", "dog", "tree", "car", "bird") if self.counts[c]]
        if not candidates:
            return None
        category = (
            "person" if "person" in candidates and self.rng.random() < 0.7 else self.rng.choice(candidates)
        )
        n = self.counts[category]
        value, words = self.rng.choice(CHANGES[self.phrasing])
        k = self.rng.randint(1, 8)
        if isinstance(value, str):
            value = value.format(n=k)
        if (isinstance(value, str) and value.startswith("-") and k >= n) or (value == 0.5 and n < 2):
            value, words = 2, CHANGES[self.phrasing][0][1]
        if target_count(value, n) > MAX_COUNT:  # beyond the world's crowds: a few more instead
            value, words = next((f"+{k}", w) for v, w in CHANGES[self.phrasing] if v == "+{n}")
        number = number_word(k) if self.rng.random() < 0.4 else str(k)
        change_text = words.format(x=plural(category), n=number)
        first = {"image": "img_0", "phrase": category}
        gen_args = {"image": "img_0", "changes": {category: change_text}}  # the user's words, passed on
        target = target_count(value, n)

        def verify(messages: list[dict[str, Any]], _images: list[Any]) -> str:
            return call("counter", image=last_new_image(messages), phrase=category)

        def final(messages: list[dict[str, Any]], _images: list[Any]) -> str:
            counted = (COUNT_TEXT.search(_text(m)) for m in messages if m["role"] == "tool")
            said = [int(found.group(1)) for found in counted if found]
            before, after = ([n, target] + said)[-2:]  # the counter's two numbers, right or not
            generated = _second_last_new_image(messages)
            new = f"{after} {plural(category)} ({generated})"
            return f"Here is a similar image with {new}; the original has {before}."

        return Turn("generate", self.template("generate", c=change_text),
                    [call("counter", **first), call("generator", **gen_args), verify, final],
                    [{"name": "counter", "arguments": first}],
                    {"phrase": category, "count": n, "changes": {category: value}, "target": target,
                     "calls": [{"name": "counter", "arguments": first}, {"name": "generator", "arguments": gen_args}]})  # fmt: skip


def _second_last_new_image(messages: list[dict[str, Any]]) -> str:
    """The image the generator made: the newest image before the verifying count's drawing."""
    seen = []
    for message in reversed(messages):
        if message["role"] == "tool":
            text = _text(message)
            found = NEW_IMAGE.search(text)
            if found:
                seen.append(found.group(1))
            if len(seen) == 2:
                return seen[1]
    return seen[-1] if seen else "the new image"


def plan_conversation(
    scene: Scene,
    rng: random.Random,
    phrasing: str = "train",
    weights: dict[str, float] | None = None,
    max_turns: int = 3,
    grammar_share: float = 0.0,
) -> list[Turn]:
    """1..max_turns turns of random tasks on `scene` (no task twice)."""
    weights = weights or WorldDataConfig().task_weights
    unknown = set(weights) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; tasks are {TASKS}")
    planner = Planner(scene, rng, phrasing, grammar_share)
    names = [t for t in TASKS if weights.get(t, 0) > 0]
    turns: list[Turn] = []
    for _ in range(rng.randint(1, max_turns)):
        left = [t for t in names if t not in {x.task for x in turns}]
        for _try in range(len(left)):
            task = rng.choices(left, [weights[t] for t in left])[0]
            turn = planner.plan(task)
            if turn is not None:
                turns.append(turn)
                break
            left.remove(task)
    return turns


def run_turns(
    image: Any,
    turns: list[Turn],
    tools: dict[str, Any],
    system: str | None = None,
    tool_images: bool = True,
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Run planned turns on one image through the agent loop with scripted replies: (messages, images);
    `tool_images` as the agent option of that name."""
    from toolvlm.agent.controllers import ScriptedController
    from toolvlm.agent.loop import Agent, AgentConfig

    controller = ScriptedController()
    agent = Agent(controller, tools, AgentConfig(max_steps=8, tool_images=tool_images))
    for k, turn in enumerate(turns):
        controller.enqueue(*turn.replies)
        for _event in agent.run(turn.text, [image] if k == 0 else []):
            pass
        unused = [r for r in controller.replies if not isinstance(r, IfNeeded)]
        if unused:
            raise RuntimeError(f"turn {turn.task!r} ended with {len(unused)} scripted replies unused")
        controller.replies.clear()
    messages = agent.trajectory.to_messages(system or agent.system_prompt(), tool_images=tool_images)
    images = [agent.memory.get(h) for h in agent.trajectory.image_handles(tool_images=tool_images)]
    return messages, images


def run_conversation(
    scene: Scene,
    turns: list[Turn],
    oracle: WorldOracle | None = None,
    system: str | None = None,
    tool_images: bool = True,
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Run the planned turns on a world scene with the oracle tools: (messages, images)."""
    oracle = oracle or WorldOracle()
    return run_turns(oracle.render(scene), turns, oracle.tools(), system, tool_images)


def planner_rng(seed: int) -> random.Random:
    """The random stream that plans the turns on scene `seed`, apart from the one that drew the scene."""
    # the scene is drawn from random.Random(seed); a str seed is hashed (sha512), so no draw here repeats its draws
    return random.Random(f"turns/{seed}")


def world_example(index: int, config: WorldDataConfig, system: str | None = None) -> Example:
    """The conversation of scene `index` of the dataset drawn with `config.seed`."""
    seed = scene_seed(config.seed, index)
    world = WorldConfig().with_composed(config.composed_share) if config.composed_share else None
    scene = sample_scene(seed, world)
    turns = plan_conversation(
        scene, planner_rng(seed), config.phrasing, config.task_weights, config.max_turns, config.grammar_share
    )
    oracle = WorldOracle(config.count_noise, seed, config.miss_rate, config.distractor_rate)
    messages, images = run_conversation(scene, turns, oracle, system, config.tool_images)
    meta = {
        "source": "world",
        "seed": seed,
        "phrasing": config.phrasing,
        "turns": [t.record() for t in turns],
    }
    return Example(messages, images, id=f"world-{config.seed}-{index:06d}", meta=meta)


def build_world_dataset(out: str | Path, config: WorldDataConfig | None = None) -> Path:
    """Write `config.n_scenes` conversations as `out/world.jsonl` with their images under `out/images/`."""
    config = config or WorldDataConfig()
    system = system_prompt(config.tools, config.prompts)
    out = Path(out)
    examples = (
        world_example(i, config, system)
        for i in tqdm(range(config.n_scenes), desc="world conversations", unit="scene")
    )
    path = write_jsonl(out / "world.jsonl", examples)
    (out / "world_data.json").write_text(json.dumps(config.__dict__, indent=2) + "\n")
    logger.info("wrote %d world conversations (%s phrasings) to %s", config.n_scenes, config.phrasing, path)
    return path
