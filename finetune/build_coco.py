"""Grounding and counting conversations from COCO-format detection annotations (an instances JSON + images).

Users turn their own labelled data into tool-use training data: for each image, "put a box around the <name>"
(a category with one instance) or "box all the <names>" (a few instances) -> a grounding call -> the answer with
the boxes; and "how many <names> are there?" -> a counter call -> the number. As for the world data, the
conversations are made by the agent loop with scripted replies and the real tool classes, whose detector here
answers from the annotations (boxes converted from COCO's [x, y, w, h] to [x0, y0, x1, y1] pixels). Crowd
annotations (`iscrowd: 1`) make a category's count unknown: such categories are not counted or boxed.

It knows the COCO format; conversations come from `build_world`'s planner types and the data format.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from toolvlm.finetune.build_world import TEMPLATES, Turn, _box_text, call, last_new_image, run_turns
from toolvlm.finetune.data import TOOLSET, Example, system_prompt, write_jsonl
from toolvlm.tools.counter import CounterTool
from toolvlm.tools.detectors import Detection, Detector
from toolvlm.tools.grounding import GroundingTool
from toolvlm.tools.layout import plural
from toolvlm.vlm.images import image_key
from toolvlm.world.oracle import normalize_phrase

logger = logging.getLogger(__name__)


@dataclass
class CocoImage:
    """One image of a COCO file: its path and its boxes [x0, y0, x1, y1] per category name."""

    path: Path
    width: int
    height: int
    boxes: dict[str, list[list[float]]]
    crowded: set[str]


def read_coco(instances: str | Path, image_dir: str | Path) -> list[CocoImage]:
    """The images of a COCO instances JSON with their boxes by category name."""
    data = json.loads(Path(instances).read_text())
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{instances}: not a COCO instances file (no {key!r})")
    names = {c["id"]: c["name"] for c in data["categories"]}
    out: dict[int, CocoImage] = {}
    for record in data["images"]:
        path = Path(image_dir) / record["file_name"]
        out[record["id"]] = CocoImage(path, record["width"], record["height"], {}, set())
    for ann in data["annotations"]:
        image = out.get(ann["image_id"])
        if image is None:
            raise ValueError(f"{instances}: annotation {ann.get('id')} names unknown image {ann['image_id']}")
        name = names[ann["category_id"]]
        if ann.get("iscrowd"):
            image.crowded.add(name)
            continue
        x, y, w, h = ann["bbox"]
        image.boxes.setdefault(name, []).append([x, y, x + w, y + h])
    return list(out.values())


class AnnotationDetector(Detector):
    """Exact boxes from annotations, looked up by image content; a phrase matches a category name."""

    backend = "annotations"

    def __init__(self) -> None:
        super().__init__()
        self.model = self
        self.boxes: dict[str, dict[str, list[list[float]]]] = {}

    def register(self, image: Image.Image, boxes: dict[str, list[list[float]]]) -> None:
        """Remember the boxes of an image."""
        self.boxes[image_key(image)] = boxes

    def load(self, tool: str = "grounding") -> None:
        """Nothing to load."""

    def detect(self, image: Image.Image, phrases: list[str], threshold: float) -> list[Detection]:
        """The annotated boxes of the categories the phrases name."""
        known = self.boxes.get(image_key(image.convert("RGB")), {})
        out = []
        for phrase in phrases:
            text = normalize_phrase(phrase)
            for name, boxes in known.items():
                if text in (name.lower(), plural(name.lower())):
                    out.extend(Detection([float(v) for v in b], 0.99, phrase) for b in boxes)
        return out


def plan_coco(
    image: CocoImage, rng: random.Random, phrasing: str = "train", max_instances: int = 6
) -> list[Turn]:
    """One grounding turn and one counting turn for an image (when its annotations allow them)."""
    usable = {n: b for n, b in image.boxes.items() if n not in image.crowded}
    turns: list[Turn] = []
    few = [n for n, b in usable.items() if len(b) <= max_instances]
    if few:
        name = rng.choice(sorted(few))
        boxes = usable[name]
        args = {"image": "img_0", "phrase": name}
        listed = ", ".join(_box_text(b) for b in boxes)
        if len(boxes) == 1:
            text = rng.choice(TEMPLATES["ground"][phrasing]).format(x=f"the {name}")
            answer = f"Here is the {name}: {listed}"
        else:
            text = rng.choice(TEMPLATES["ground_all"][phrasing]).format(x=plural(name))
            answer = f"I found {len(boxes)} {plural(name)}: {listed}"

        def final(messages: list[dict[str, Any]], _images: list[Any], answer: str = answer) -> str:
            return f"{answer} (drawn in {last_new_image(messages)})."

        turns.append(Turn("ground", text, [call("grounding", **args), final],
                          [{"name": "grounding", "arguments": args}], {"boxes": boxes, "phrase": name}))  # fmt: skip
    if usable:
        name = rng.choice(sorted(usable))
        n = len(usable[name])
        args = {"image": "img_0", "phrase": name}
        text = rng.choice(TEMPLATES["count"][phrasing]).format(x=plural(name))
        answer = f"There are {n} {plural(name)}." if n != 1 else f"There is 1 {name}."
        turns.append(Turn("count", text, [call("counter", **args), answer],
                          [{"name": "counter", "arguments": args}], {"count": n, "phrase": name}))  # fmt: skip
    rng.shuffle(turns)
    return turns


def build_coco_dataset(
    instances: str | Path,
    image_dir: str | Path,
    out: str | Path,
    seed: int = 0,
    phrasing: str = "train",
    tools: tuple[str, ...] | list[str] = TOOLSET,
) -> Path:
    """Write one conversation per annotated image as `out/coco.jsonl` (tool-made images under `out/images/`)."""
    rng = random.Random(seed)
    system = system_prompt(tools)
    detector = AnnotationDetector()
    grounding = GroundingTool(backend="inhouse")
    grounding.detector = detector
    counter = CounterTool(backend="inhouse", grounding=grounding)
    tool_map = {"grounding": grounding, "counter": counter}
    examples = []
    for image in read_coco(instances, image_dir):
        turns = plan_coco(image, rng, phrasing)
        if not turns:
            continue
        with Image.open(image.path) as im:
            pixels = im.convert("RGB")
        detector.register(pixels, image.boxes)
        messages, images = run_turns(pixels, turns, tool_map, system)
        images[0] = image.path  # the user's image stays where it is
        meta = {"source": "coco", "file": str(image.path), "turns": [t.record() for t in turns]}
        examples.append(Example(messages, images, id=f"coco-{image.path.stem}", meta=meta))
    path = write_jsonl(Path(out) / "coco.jsonl", examples)
    logger.info("wrote %d COCO conversations to %s", len(examples), path)
    return path
