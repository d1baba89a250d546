"""Request phrasing families for the distribution-shift evaluation, and the turns planned from them.

Each family is its own set of templates, written fresh in the question styles of other tool datasets (GPT4Tools,
LLaVA-Plus, Visual ChatGPT, RefCOCO) and never in `build_world`'s grammar:

- `describe`: open descriptions and captions ("Can you tell me what's going on in this picture?");
- `detect`: yes/no detection ("Is there a dog in the image?", "Detect if a bird is present");
- `ground`: localisation ("Point out the location of the red car", "Highlight the tree", "Where is the ball?
  Mark it."), of one object, one object by a relation, or every object of a kind;
- `count`: counting ("Could you count the birds for me?");
- `generate`: similar images with a count change ("Based on this image, create a fresh one that has ...");
- `conditional`: generation that names an edge map, depth or segmentation ("With the edge map of this image,
  generate a new image with twice as many people");
- `polite`: indirect requests for any of the tasks ("I was wondering if you could ...").

`plan_shift(n, seed)` pairs scenes of the independent composer (`shift_scenes`) with turns of these families, in
the `Turn` form `evaluation.controller` scores (expected first calls, truth, and scripted replies of a perfect
controller for tests). A family may accept more than one first act (a yes/no question answered directly or by a
grounding search; a generation started by the counter or by the generator): `truth["alternatives"]`.

Evaluation only: training code (build_world, world_data, train_*) must never import this module, so that the
controller never trains on these phrasings (tests/test_finetune_shift.py checks the texts stay disjoint).
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from toolvlm.evaluation.shift_scenes import ShiftConfig, compose_scene
from toolvlm.finetune.build_world import Turn
from toolvlm.tools.count_change import target_count
from toolvlm.tools.number_words import number_word
from toolvlm.world.scene import Scene
from toolvlm.world.text import annotate, count_phrase, plural

SHIFT_SEED = 737373  # the shifted set's seed: scenes are compose_scene(f"{seed}/{i}")
MAX_TARGET = 60  # a generation request stays within crowds the world draws

# {x}: a noun phrase ("red car", or an expression "the person next to the tree" for grounding); {xs}: a plural
# noun; {c}: a count change; {cond}: a control signal named by a conditional generation request.
FAMILIES: dict[str, dict[str, list[str]]] = {
    "describe": {
        "describe": ["Can you tell me what's going on in this picture?", "Provide a detailed description of the given image.",
                     "What is happening in the scene depicted here?", "Look at the image and describe everything you notice.",
                     "Please give a thorough account of what this image contains.", "Analyze the image and explain its contents."],
        "caption": ["Write a brief caption for the image.", "In one short sentence, what does this picture show?",
                    "Provide a one-sentence summary of the visual content.", "Caption it briefly, please."],
    },
    "detect": {
        "vqa": ["Is there a {x} in the image?", "Detect if a {x} is present.", "Does this picture have any {xs} in it?",
                "Are there any {xs} visible here?", "Check whether the image includes a {x}.",
                "Tell me yes or no: is a {x} in this scene?", "Can a {x} be found in this photo?"],
    },
    "ground": {
        "ground": ["Point out the location of {x}.", "Highlight {x}.", "Where is {x}? Mark it.",
                   "Detect {x} and give its bounding box.", "Please localize {x} in the image.",
                   "Which region contains {x}? Give the coordinates.", "Output the bounding box of {x}."],
        "ground_all": ["Mark the positions of all the {xs}.", "Point out each {x} in the picture.",
                       "Detect all {xs} and return their boxes.", "Highlight every {x} you can find."],
    },
    "count": {
        "count": ["What's the total number of {xs} here?", "Could you count the {xs} for me?",
                  "How many {xs} appear in this image?", "Count all {xs} present in the scene.",
                  "Tell me the number of {xs} you can see.", "What is the count of {xs} in this photo?",
                  "Please report the {xs} count."],
    },
    "generate": {
        "generate": ["Generate a new picture based on this one, featuring {c}.",
                     "Based on this image, create a fresh one that has {c}.",
                     "Please synthesize an image resembling this one with {c}.",
                     "Redraw this scene so that it has {c}."],
    },
    "conditional": {
        "generate": ["With the {cond} of this image, generate a new image with {c}.",
                     "Using the {cond} of this picture, make a version with {c}.",
                     "Condition on the {cond} of this image and produce a picture that has {c}.",
                     "Keep the {cond} of this photo and draw it again with {c}.",
                     "Extract the {cond} from this image, then generate an image with {c}."],
    },
    "polite": {
        "describe": ["I was wondering if you could describe what this picture shows.",
                     "Would you mind telling me what's in this image?"],
        "vqa": ["I was wondering if you could check whether there is a {x} here.",
                "Would you be so kind as to tell me if this image has any {xs}?"],
        "ground": ["I was wondering if you could show me where {x} is.",
                   "If it's not too much trouble, could you mark {x} for me?"],
        "count": ["I was wondering if you could count the {xs} in this picture.",
                  "Would you mind letting me know how many {xs} there are?"],
        "generate": ["I was wondering if you could produce another version of this image that has {c}.",
                     "Would you kindly generate an image resembling this one, only with {c}?"],
    },
}  # fmt: skip
# Count changes in words none of build_world's change phrasings use, with what they mean ({n}: 1-8, digits or
# words); every one reads back to its value through tools/count_change.py (tests check it).
CHANGES: list[tuple[Any, str]] = [
    (2, "2x the {xs}"), (2, "a doubled number of {xs}"), (3, "the number of {xs} tripled"), (0.5, "half of the {xs}"),
    ("+{n}", "{n} extra {xs}"), ("+{n}", "plus {n} {xs}"), ("-{n}", "the {xs} minus {n}"),
    ("={n}", "a total of {n} {xs}"), ("={n}", "precisely {n} {xs}"),
]  # fmt: skip
CONDITIONS: tuple[str, ...] = ("edge map", "canny edges", "depth map", "depth", "segmentation map",
                               "segmentation", "HED boundaries", "scribble")  # fmt: skip
FAMILY_NAMES = tuple(FAMILIES)
GENERATE_CATEGORIES = ("person", "dog", "tree", "car", "bird")
NEW_IMAGE = re.compile(r"New images: (img_\d+)")


def family_of_task(task: str) -> str:
    """The phrasing family an in-distribution task's requests belong to (for per-family tool selection)."""
    return {"describe": "describe", "caption": "describe", "vqa": "detect", "ground": "ground",
            "refer": "ground", "ground_all": "ground", "count": "count", "generate": "generate"}[task]  # fmt: skip


def _call(name: str, **arguments: Any) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def _newest_image(messages: list[dict[str, Any]]) -> str:
    """The newest image handle a tool reported (for the scripted replies of a perfect controller)."""
    for message in reversed(messages):
        if message["role"] == "tool":
            text = "\n".join(p.get("text", "") for p in message["content"] if p.get("type") == "text")
            found = NEW_IMAGE.search(text)
            if found:
                return found.group(1)
    raise ValueError("no tool has made an image yet")


def _box(box: list[int]) -> str:
    return "[" + ", ".join(str(round(v)) for v in box) + "]"


class ShiftPlanner:
    """Plans turns of one phrasing family on one scene."""

    def __init__(self, scene: Scene, rng: random.Random) -> None:
        self.scene, self.rng = scene, rng
        self.notes = annotate(scene)
        self.counts = scene.counts()

    def plan(self, family: str, task: str) -> Turn | None:
        """A turn of `task` phrased in `family`, or None when the scene does not allow it."""
        if task not in FAMILIES[family]:
            raise ValueError(
                f"family {family!r} has no {task!r} phrasings; it has {', '.join(FAMILIES[family])}"
            )
        turn = getattr(self, f"_{task}")(FAMILIES[family][task], family)
        if turn is not None:
            turn.truth["family"] = family
        return turn

    def _text(self, templates: list[str], **fill: Any) -> str:
        return self.rng.choice(templates).format(**fill)

    def _present(self) -> list[str]:
        return sorted(c for c, n in self.counts.items() if n)

    def _describe(self, templates: list[str], family: str) -> Turn:
        reply = self.notes["paragraph"]
        return Turn("describe", self._text(templates), [reply], [], self._description_truth())

    def _caption(self, templates: list[str], family: str) -> Turn:
        # the caption leaves out the sky; the paragraph names everything, as a perfect reply must
        reply = self.notes["paragraph"]
        return Turn("caption", self._text(templates), [reply], [], self._description_truth())

    def _description_truth(self) -> dict[str, Any]:
        """What a description is scored on; answering directly or asking the captioner first are both right."""
        describe = {"name": "captioner", "arguments": {"image": "img_0"}}
        return {"categories": self._present(), "alternatives": [describe]}

    def _vqa(self, templates: list[str], family: str) -> Turn:
        present = [c for c in self._present() if c != "person"]
        absent = [c for c, n in self.counts.items() if not n]
        pool = present if present and (not absent or self.rng.random() < 0.5) else absent
        category = self.rng.choice(pool)
        n = self.counts[category]
        reply = (
            f"Yes, I can see {count_phrase(n, category, plural(category))}."
            if n
            else f"No, I see no {plural(category)}."
        )
        text = self._text(templates, x=category, xs=plural(category))
        search = {"name": "grounding", "arguments": {"image": "img_0", "phrase": category}}
        truth = {
            "answer": "yes" if n else "no",
            "presence": bool(n),
            "category": category,
            "alternatives": [search],
        }
        return Turn("vqa", text, [reply], [], truth)

    def _ground(self, templates: list[str], family: str) -> Turn | None:
        expressions = self.notes["referring"]
        if not expressions:
            return None
        expr = self.rng.choice(expressions)
        task = "ground" if set(expr["expr"]) <= {"category", "color"} else "refer"
        phrase = expr["text"]
        args = {"image": "img_0", "phrase": phrase}
        name = phrase[4:] if phrase.startswith("the ") else phrase

        def answer(messages: list[dict[str, Any]], _images: list[Any]) -> str:
            return f"The {name} is at {_box(expr['box'])} (drawn in {_newest_image(messages)})."

        replies = [_call("grounding", **args), answer]
        truth = {"boxes": [expr["box"]], "phrase": phrase}
        return Turn(
            task, self._text(templates, x=phrase), replies, [{"name": "grounding", "arguments": args}], truth
        )

    def _ground_all(self, templates: list[str], family: str) -> Turn | None:
        groups = [c for c, n in self.counts.items() if 2 <= n <= 8]
        if not groups:
            return None
        category = self.rng.choice(groups)
        boxes = [o.box for o in self.scene.objects if o.category == category]
        args = {"image": "img_0", "phrase": category}
        reply = f"There are {len(boxes)} {plural(category)}: " + ", ".join(_box(b) for b in boxes) + "."
        text = self._text(templates, x=category, xs=plural(category))
        truth = {"boxes": boxes, "phrase": category}
        return Turn("ground_all", text, [_call("grounding", **args), reply],
                    [{"name": "grounding", "arguments": args}], truth)  # fmt: skip

    def _count(self, templates: list[str], family: str) -> Turn | None:
        present = [c for c in self._present() if c != "sun"]
        if not present and self.rng.random() < 0.5:
            return None  # an empty scene now and then ("no people"), not every time
        category = (
            "person"
            if "person" in present and self.rng.random() < 0.6
            else self.rng.choice(present or ["person"])
        )
        n = self.counts[category]
        args = {"image": "img_0", "phrase": category}
        reply = f"I count {n} {category if n == 1 else plural(category)}."
        text = self._text(templates, xs=plural(category), x=category)
        return Turn("count", text, [_call("counter", **args), reply], [{"name": "counter", "arguments": args}],
                    {"count": n, "phrase": category})  # fmt: skip

    def _change(self, n: int) -> tuple[Any, str]:
        """A change of a count n and its words (a few more instead when the target leaves the world's crowds)."""
        value, words = self.rng.choice(CHANGES)
        k = self.rng.randint(1, 8)
        number = number_word(k) if self.rng.random() < 0.4 else str(k)
        if isinstance(value, str):
            value = value.format(n=k)
        if (isinstance(value, str) and value.startswith("-") and k >= n) or (value == 0.5 and n < 2):
            value, words = 2, CHANGES[0][1]
        if target_count(value, n) > MAX_TARGET:
            value, words = f"+{k}", CHANGES[4][1]
        return value, words.replace("{n}", number)

    def _generate(self, templates: list[str], family: str) -> Turn | None:
        candidates = [c for c in GENERATE_CATEGORIES if 0 < self.counts[c] <= MAX_TARGET - 8]
        if not candidates:
            return None
        category = (
            "person" if "person" in candidates and self.rng.random() < 0.6 else self.rng.choice(candidates)
        )
        n = self.counts[category]
        value, words = self._change(n)
        change_text = words.format(xs=plural(category))
        text = self._text(templates, c=change_text, cond=self.rng.choice(CONDITIONS))
        first = {"image": "img_0", "phrase": category}
        gen_args = {"image": "img_0", "changes": {category: change_text}}
        target = target_count(value, n)

        def verify(messages: list[dict[str, Any]], _images: list[Any]) -> str:
            return _call("counter", image=_newest_image(messages), phrase=category)

        replies = [
            _call("counter", **first),
            _call("generator", **gen_args),
            verify,
            f"Here is the new image with {target} {plural(category)}; the original has {n}.",
        ]
        truth = {
            "phrase": category,
            "count": n,
            "changes": {category: value},
            "target": target,
            "alternatives": [{"name": "generator", "arguments": gen_args}],
        }
        return Turn("generate", text, replies, [{"name": "counter", "arguments": first}], truth)  # fmt: skip


def plan_shift(
    n: int,
    seed: int = SHIFT_SEED,
    config: ShiftConfig | None = None,
    families: tuple[str, ...] = FAMILY_NAMES,
) -> list[tuple[Scene, Turn]]:
    """n (scene, turn) pairs of the shifted set, cycling through families and each family's tasks;
    deterministic in `seed`."""
    unknown = set(families) - set(FAMILIES)
    if unknown or not families:
        raise ValueError(f"unknown phrasing families {sorted(unknown)}; families are {', '.join(FAMILIES)}")
    out: list[tuple[Scene, Turn]] = []
    used = {f: 0 for f in families}  # turns planned per family, to cycle through its tasks
    i = 0
    while len(out) < n:
        family = families[len(out) % len(families)]
        tasks = list(FAMILIES[family])
        scene = compose_scene(f"{seed}/{i}", config)
        planner = ShiftPlanner(scene, random.Random(f"shift-turn/{seed}/{i}"))
        for k in range(len(tasks)):
            turn = planner.plan(family, tasks[(used[family] + k) % len(tasks)])
            if turn is not None:
                out.append((scene, turn))
                used[family] += 1
                break
        i += 1
    return out
