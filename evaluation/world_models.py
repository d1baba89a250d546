"""`toolvlm eval world-models`: score the in-house world models on fresh held-out scenes, against the issue's targets.

Scenes come from the eval seed range (`world_data.scene_seed('eval', i)`, disjoint from every training seed).
Each part loads through its tools backend (`build_tools`) from the bundle (`toolvlm.bundle.part(name)`) or from
a folder given on the command line, and is skipped with a note when its weights are absent:

- encoder: zero-shot category presence: for each scene and each of the 12 categories, 'a photo with a dog' vs
  'a photo with no dogs' by cosine similarity; accuracy (and the majority-class baseline on the same scenes).
- grounding: AP50 (VOC all-point) per phrase, averaged over category phrases and over colour phrases (every
  phrase is queried on every scene; detections on scenes without the phrase are false positives); referring
  expressions: the best box the grounding tool gives (the detector, with position words and landmarks resolved
  by geometry, tools/referring.py) has IoU >= 0.5 with the target; `referring_accuracy_detector` scores the
  detector's top box for the whole phrase alone.
- counting (the counter tool on the detector, its default thresholds): exact for counts <= 30 (every present
  category of the scenes), within 10% for 31-60 (people in crowd scenes).
- captioner: F1 of the (category) and (category, colour) items a caption mentions against the scene's objects;
  the reference captions' own F1 is reported as the ceiling of the metric.
- generator: images from held-out layouts; a layout agrees when every category's count read back by the counter
  is within 10% of the layout's (also per category, pooled over every (layout, category) pair, and for the
  world's own drawings of the layouts: the ceiling the detector allows).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from toolvlm.bundle import WORLD_PARTS
from toolvlm.finetune.world_data import colour_phrases, layout_of, presence_prompts, scene_seed
from toolvlm.tools import grounding, imaging
from toolvlm.world import CATEGORIES, COLOURS, annotate, render_scene, sample_scene
from toolvlm.world.text import describe, plural

log = logging.getLogger(__name__)

PARTS = WORLD_PARTS  # the parts it scores
TARGETS = {
    "encoder.presence_accuracy": 0.95,
    "grounding.ap50_category": 0.90,
    "grounding.ap50_colour": 0.90,
    "grounding.referring_accuracy": 0.85,
    "counting.exact_upto_30": 0.90,
    "counting.within10_31_60": 0.90,
    "captioner.object_f1": 0.90,
    "generator.count_agreement": 0.80,
}
CROWD_OFFSET = 500_000_000  # crowd scenes for counting use eval seeds from here


@dataclass
class EvalOptions:
    """What to evaluate: how many scenes, where the weights are, sampling options."""

    n: int = 50
    offset: int = 0
    models: dict[str, str | None] = field(default_factory=dict)  # part -> folder (None: the bundle's)
    count_threshold: float | None = None  # None: the counter tool's default
    n_generate: int = 10
    gen_steps: int | None = None  # the generator's own default
    caption_tokens: int = 80
    parts: tuple[str, ...] = PARTS  # which parts to score (the generator is scored with the detector)

    def __post_init__(self) -> None:
        unknown = set(self.parts) - set(PARTS)
        if unknown or not self.parts:
            raise ValueError(f"unknown parts {sorted(unknown)}; parts are {', '.join(PARTS)}")


def model_path(part: str, given: str | None) -> Path | None:
    """The folder to evaluate for a part: the given one, else the bundle's when present, else None."""
    from toolvlm import bundle

    if given:
        return Path(given)
    return bundle.part(part) if bundle.has(part) else None


def eval_scenes(n: int, offset: int, family: str | None = None) -> list[Any]:
    """n held-out scenes (eval seed range), optionally of one family."""
    base = offset + (CROWD_OFFSET if family == "crowd" else 0)
    return [sample_scene(scene_seed("eval", base + i), family=family) for i in range(n)]


# --- geometry and AP ---------------------------------------------------------------------------------------


def iou(a: list[float], b: list[float]) -> float:
    """IoU of two [x0, y0, x1, y1] boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def average_precision(dets: list[tuple[float, int, list[float]]], gts: dict[int, list[list[float]]]) -> float:
    """VOC all-point AP at IoU 0.5 for one phrase: dets (score, image, box), gts image -> boxes."""
    n_gt = sum(len(b) for b in gts.values())
    if n_gt == 0:
        return float("nan")
    used = {k: [False] * len(v) for k, v in gts.items()}
    tp = []
    for _score, img, box in sorted(dets, key=lambda d: -d[0]):
        best, best_j = 0.0, -1
        for j, g in enumerate(gts.get(img, [])):
            o = iou(box, g)
            if o > best:
                best, best_j = o, j
        hit = best >= 0.5 and not used[img][best_j]
        if hit:
            used[img][best_j] = True
        tp.append(1.0 if hit else 0.0)
    if not tp:
        return 0.0
    tps = np.cumsum(tp)
    recall = tps / n_gt
    precision = tps / np.arange(1, len(tp) + 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


# --- the detector, one forward for many independent phrases --------------------------------------------------


def phrase_detections(detector: Any, image: Any, phrases: list[str], top_k: int = 100) -> list[tuple]:
    """Per phrase (boxes (N, 4) pixels, scores (N,)) after per-phrase NMS; phrases are scored independently."""
    boxes, probs, views = detector.phrase_scores(image, phrases)
    result = []
    for q in range(len(phrases)):
        order = np.argsort(-probs[:, q])[:top_k]
        keep = imaging.nms(
            boxes[order], probs[order, q], 0.5, groups=views[order], cross_iou=detector.view_iou
        )
        result.append((boxes[order][keep], probs[order, q][keep]))
    return result


def eval_grounding(tools: dict[str, Any], scenes: list[Any]) -> dict[str, Any]:
    """AP50 for category and colour phrases; referring-expression accuracy at IoU 0.5."""
    detector = tools["grounding"].detector
    categories, colours = list(CATEGORIES), colour_phrases()
    dets: dict[str, list] = {p: [] for p in categories + colours}
    gts: dict[str, dict[int, list]] = {p: {} for p in categories + colours}
    hits = hits_detector = total = 0
    threshold = detector.threshold("grounding", grounding.DEFAULT_THRESHOLD)
    for k, scene in enumerate(tqdm(scenes, desc="grounding", mininterval=10)):
        image, ann = render_scene(scene), annotate(scene)
        for o in ann["objects"]:
            gts[o["category"]].setdefault(k, []).append(o["box"])
            if o.get("color"):
                gts.setdefault(describe(o["category"], o["color"]), {}).setdefault(k, []).append(o["box"])
        found = phrase_detections(detector, image, categories + colours)
        for phrase, (boxes, scores) in zip(categories + colours, found, strict=True):
            dets[phrase] += [(float(s), k, b.tolist()) for b, s in zip(boxes, scores, strict=True)]
        referring = ann["referring"]
        if referring:
            texts = [r["text"] for r in referring]
            found = phrase_detections(detector, image, texts, top_k=5)
            for r, (boxes, _scores) in zip(referring, found, strict=True):
                total += 1
                hits_detector += bool(len(boxes)) and iou(boxes[0].tolist(), r["box"]) >= 0.5
                located, _ = tools["grounding"].find(image, [r["text"]], threshold)  # one request each
                hits += bool(located.boxes) and iou(located.boxes[0], r["box"]) >= 0.5
    ap = {p: average_precision(dets[p], gts.get(p, {})) for p in dets}
    cat = [ap[p] for p in categories if not np.isnan(ap[p])]
    col = [ap[p] for p in colours if not np.isnan(ap[p])]
    return {
        "ap50_category": float(np.mean(cat)) if cat else None,
        "ap50_colour": float(np.mean(col)) if col else None,
        "referring_accuracy": hits / total if total else None,
        "referring_accuracy_detector": hits_detector / total if total else None,
        "referring_n": total,
        "ap50_per_category": {p: round(ap[p], 3) for p in categories if not np.isnan(ap[p])},
    }


def eval_counting(
    tools: dict[str, Any], scenes: list[Any], crowds: list[Any], threshold: float | None
) -> dict:
    """Counter tool: exact for counts <= 30 (present categories), within 10% for 31-60 people in crowds."""
    counter = tools["counter"]
    exact, n_small, close, n_large = 0, 0, 0, 0
    for scene in tqdm(scenes + crowds, desc="counting", mininterval=10):
        image, counts = render_scene(scene), scene.counts()
        for category, n in counts.items():
            if n == 0 or (n > 30 and category != "person"):
                continue
            got = counter.forward(image, category, threshold=threshold).artifact["count"]
            if n <= 30:
                n_small += 1
                exact += got == n
            else:
                n_large += 1
                close += abs(got - n) <= 0.1 * n
    return {
        "exact_upto_30": exact / n_small if n_small else None,
        "n_upto_30": n_small,
        "within10_31_60": close / n_large if n_large else None,
        "n_31_60": n_large,
        "threshold": counter.effective_threshold(threshold),
    }


# --- captions -------------------------------------------------------------------------------------------------

_NOUNS = (
    {c: c for c in CATEGORIES} | {plural(c): c for c in CATEGORIES} | {"sunny": "sun", "people": "person"}
)


def caption_items(text: str) -> set[tuple[str, ...]]:
    """(category,) and (category, colour) items a caption mentions ('a red frisbee', 'people in blue shirts')."""
    words = re.findall(r"[a-z]+", text.lower())
    items: set[tuple[str, ...]] = set()
    for i, w in enumerate(words):
        category = _NOUNS.get(w)
        if category is None:
            continue
        items.add((category,))
        if i and words[i - 1] in COLOURS and category != "person":
            items.add((category, words[i - 1]))
        j = i + 1
        if j < len(words) and words[j] == "in":  # 'people in red and blue shirts', 'flowers in red and white'
            j += 1
            if j < len(words) and words[j] in ("a", "an"):  # 'a person in a red shirt'
                j += 1
            while j < len(words) and (words[j] in COLOURS or words[j] == "and"):
                if words[j] in COLOURS:
                    items.add((category, words[j]))
                j += 1
    return items


def scene_items(scene: Any) -> set[tuple[str, ...]]:
    """The (category,) and (category, colour) items of a scene."""
    items: set[tuple[str, ...]] = set()
    for o in scene.objects:
        items.add((o.category,))
        if o.color:
            items.add((o.category, o.color))
    return items


def f1(predicted: set, truth: set) -> float:
    """F1 of two sets (1.0 when both are empty)."""
    if not predicted and not truth:
        return 1.0
    tp = len(predicted & truth)
    return 2 * tp / (len(predicted) + len(truth))


def eval_captioner(tools: dict[str, Any], scenes: list[Any]) -> dict[str, Any]:
    """Mean object F1 of generated captions, and of the reference captions (the metric's ceiling)."""
    captioner = tools["captioner"]
    got, ceiling, examples = [], [], []
    for scene in tqdm(scenes, desc="captioner", mininterval=10):
        text = captioner.forward(render_scene(scene)).artifact["caption"]
        truth = scene_items(scene)
        got.append(f1(caption_items(text), truth))
        ceiling.append(f1(caption_items(annotate(scene)["caption"]), truth))
        if len(examples) < 3:
            examples.append(text)
    return {"object_f1": float(np.mean(got)), "reference_f1": float(np.mean(ceiling)), "examples": examples}


# --- encoder and generator --------------------------------------------------------------------------------


def _features(output: Any) -> Any:
    """Unit-norm projected features (transformers 5 returns them as `pooler_output` of a model output)."""
    x = getattr(output, "pooler_output", output)
    return x / x.norm(dim=-1, keepdim=True)


def eval_encoder(folder: Path, scenes: list[Any]) -> dict[str, Any]:
    """Zero-shot presence accuracy over scenes x categories (and the majority-class baseline)."""
    import torch
    from transformers import AutoProcessor, OwlViTModel

    model = OwlViTModel.from_pretrained(folder).float().eval()
    processor = AutoProcessor.from_pretrained(folder)
    prompts = presence_prompts()
    with torch.inference_mode():
        tokens = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        text = _features(model.get_text_features(**tokens))
        truth, predicted = [], []
        for scene in tqdm(scenes, desc="encoder", mininterval=10):
            pixels = processor(images=render_scene(scene), return_tensors="pt")["pixel_values"]
            image = _features(model.get_image_features(pixel_values=pixels))
            sims = (image @ text.t())[0]
            k = len(CATEGORIES)
            predicted.append((sims[:k] > sims[k:]).numpy())
            truth.append(np.array([scene.counts()[c] > 0 for c in CATEGORIES]))
    truth_a, pred_a = np.stack(truth), np.stack(predicted)
    majority = np.maximum(truth_a.mean(0), 1 - truth_a.mean(0)).mean()
    return {"presence_accuracy": float((truth_a == pred_a).mean()), "majority_baseline": float(majority)}


def eval_generator(
    tools: dict[str, Any], scenes: list[Any], steps: int | None, threshold: float | None = None
) -> dict[str, Any]:
    """Generate from held-out layouts; agreement when every layout category's detected count is within 10%.
    The same check on the world's own drawings of the layouts is reported as the ceiling the detector allows."""
    backend, counter = tools["generator"].backend, tools["counter"]
    steps = steps or backend.default_steps()

    def agreement(image: Any, counts: dict[str, int]) -> dict[str, bool]:
        got = {c: counter.forward(image, c, threshold=threshold).artifact["count"] for c in counts}
        return {c: abs(got[c] - n) <= 0.1 * n for c, n in counts.items()}

    generated, drawn = [], []
    for k, scene in enumerate(tqdm(scenes, desc="generator", mininterval=10)):
        layout = layout_of(annotate(scene))
        generated.append(agreement(backend.layout(None, layout, seed=k, steps=steps), layout.counts()))
        drawn.append(agreement(render_scene(scene), layout.counts()))
    per_category = {
        c: round(float(np.mean([a[c] for a in generated if c in a])), 3)
        for c in CATEGORIES
        if any(c in a for a in generated)
    }
    pairs = [ok for a in generated for ok in a.values()]  # every (layout, category) read back
    return {
        "count_agreement": float(np.mean([all(a.values()) for a in generated])) if scenes else None,
        "reference_agreement": float(np.mean([all(a.values()) for a in drawn])) if scenes else None,
        "category_agreement": float(np.mean(pairs)) if pairs else None,
        "per_category": per_category,
        "n": len(scenes),
        "steps": steps,
    }


# --- all parts ----------------------------------------------------------------------------------------------


def evaluate(options: EvalOptions) -> dict[str, Any]:
    """Score every part whose weights exist; absent parts get a note. Returns a JSON-ready dict."""
    from toolvlm.tools.registry import build_tools

    paths = {p: model_path(p, options.models.get(p)) if p in options.parts else None for p in PARTS}
    scenes = eval_scenes(options.n, options.offset)
    results: dict[str, Any] = {"n": options.n, "offset": options.offset, "targets": TARGETS}
    missing = {
        p: f"skipped: no {p} weights (bundle/{p}/ or --{p} DIR)" if p in options.parts else "not asked for"
        for p, v in paths.items()
        if v is None
    }
    if paths["encoder"] is not None:
        results["encoder"] = eval_encoder(paths["encoder"], scenes)
    if paths["detector"] is not None:
        tools = build_tools(
            {"grounding": {"backend": "inhouse", "model": str(paths["detector"])}, "counter": {}}
        )
        tools["grounding"].setup()
        results["grounding"] = eval_grounding(tools, scenes)
        crowds = eval_scenes(max(1, options.n // 2), options.offset, family="crowd")
        results["counting"] = eval_counting(tools, scenes, crowds, options.count_threshold)
        if paths["generator"] is not None:
            gen = build_tools({"generator": {"backend": "inhouse", "model": str(paths["generator"])}})
            gen["generator"].setup()
            tools.update(gen)
            results["generator"] = eval_generator(
                tools, scenes[: options.n_generate], options.gen_steps, options.count_threshold
            )
    elif paths["generator"] is not None:
        missing["generator"] = (
            "skipped: the generator is scored by the detector, which is absent or not asked for"
        )
    if paths["captioner"] is not None:
        config = json.loads((paths["captioner"] / "config.json").read_text())
        positions = config.get("text_config", {}).get("max_position_embeddings", options.caption_tokens + 2)
        tokens = min(options.caption_tokens, positions - 2)  # a caption cannot outgrow the position table
        cap = build_tools(
            {"captioner": {"backend": "inhouse", "model": str(paths["captioner"]), "max_new_tokens": tokens}}
        )
        cap["captioner"].setup()
        results["captioner"] = eval_captioner(cap, scenes)
    results["skipped"] = missing
    results["models"] = {p: str(v) if v else None for p, v in paths.items()}
    return results


def summary_lines(results: dict[str, Any]) -> list[str]:
    """Human-readable lines: each figure against its target."""
    lines = [f"world models on {results['n']} held-out scenes (offset {results['offset']})"]
    for key, target in TARGETS.items():
        section, name = key.split(".")
        value = results.get(section, {}).get(name)
        shown = "n/a" if value is None else f"{value:.3f}"
        mark = "" if value is None else ("  ok" if value >= target else "  below target")
        lines.append(f"  {key:32s} {shown:>7s}  (target >= {target}){mark}")
    for part, note in results.get("skipped", {}).items():
        lines.append(f"  {part}: {note}")
    return lines
