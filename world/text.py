"""Words about world scenes: relations between boxes, captions, referring expressions, counts, phrases.

Everything here is computed from the `Scene` data alone (boxes, categories, colours, attributes), so the text
always agrees with what `draw` paints. Relations are image-plane relations between boxes: `left of` /
`right of` need the boxes to share some rows, `above` / `below` some columns, and `next to` a small gap at about
the same ground line. A referring expression is kept only if `resolve_expression` finds exactly its target.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from toolvlm.tools.number_words import number_word
from toolvlm.world.scene import CATEGORIES, PALETTES, Object, Scene

RELATIONS: tuple[str, ...] = ("left of", "right of", "next to", "above", "below")
MAX_EXPRESSIONS = 12
MAX_PEOPLE_FOR_ALL_PAIRS = 12


def plural(category: str) -> str:
    """The plural noun of a category."""
    return {"person": "people", "bench": "benches"}.get(category, category + "s")


def count_phrase(n: int, noun: str, noun_plural: str) -> str:
    """'a dog', 'three dogs', '14 people', 'about 40 people': exact up to 20, rounded to 5 above."""
    if n == 1:
        return ("an " if noun[0] in "aeiou" else "a ") + noun
    if n <= 20:
        return f"{('no' if n == 0 else number_word(n)) if n <= 12 else n} {noun_plural}"
    return f"about {5 * round(n / 5)} {noun_plural}"


def describe(category: str, color: str | None, n: int = 1) -> str:
    """Noun phrase without article: 'red frisbee', 'person in a blue shirt', 'people in blue shirts', 'trees'."""
    if category == "person" and color:
        article = "an" if color[0] in "aeiou" else "a"
        return f"person in {article} {color} shirt" if n == 1 else f"people in {color} shirts"
    noun = category if n == 1 else plural(category)
    return f"{color} {noun}" if color else noun


def object_phrases(obj: Object) -> list[str]:
    """Phrases that name this object (for detector queries): its category, then with its colour."""
    phrases = [obj.category]
    if obj.color:
        phrases.append(describe(obj.category, obj.color))
    return phrases


def vocabulary() -> list[str]:
    """Every category and colour phrase the world uses, for open-vocabulary training and evaluation."""
    words = [*CATEGORIES, *(plural(c) for c in CATEGORIES)]
    for category, palette in PALETTES.items():
        words += [describe(category, color) for color in palette]
    return words


# --- relations ---------------------------------------------------------------------------------------------


def _gap(a0: float, a1: float, b0: float, b1: float) -> float:
    """Distance between intervals [a0, a1) and [b0, b1); negative when they overlap."""
    return max(a0, b0) - min(a1, b1)


def relation_holds(a: Object, rel: str, b: Object) -> bool:
    """Whether `a <rel> b` holds for the boxes of a and b."""
    if rel == "right of":
        return relation_holds(b, "left of", a)
    if rel == "below":
        return relation_holds(b, "above", a)
    if rel == "left of":
        share_rows = _gap(a.box[1], a.box[3], b.box[1], b.box[3]) < 0
        return share_rows and a.cx < b.cx and a.box[2] <= b.box[0] + 0.25 * min(a.width, b.width)
    if rel == "above":
        share_cols = _gap(a.box[0], a.box[2], b.box[0], b.box[2]) < 0
        return share_cols and a.cy < b.cy and a.box[3] <= b.box[1] + 0.25 * min(a.height, b.height)
    if rel == "next to":
        gap_x = _gap(a.box[0], a.box[2], b.box[0], b.box[2])
        share_rows = _gap(a.box[1], a.box[3], b.box[1], b.box[3]) < 0
        same_ground = abs(a.box[3] - b.box[3]) <= 0.5 * max(a.height, b.height)
        return share_rows and same_ground and gap_x <= 0.5 * max(a.width, b.width) and a is not b
    raise ValueError(f"unknown relation {rel!r}; relations are: {', '.join(RELATIONS)}")


def relations(scene: Scene) -> list[list[Any]]:
    """`[i, relation, j]` triples for ordered pairs; in crowds, person-person pairs are left out."""
    objs = scene.objects
    all_pairs = sum(o.category == "person" for o in objs) <= MAX_PEOPLE_FOR_ALL_PAIRS
    out: list[list[Any]] = []
    for i, a in enumerate(objs):
        for j, b in enumerate(objs):
            if i == j or (not all_pairs and a.category == b.category == "person"):
                continue
            out += [[i, rel, j] for rel in RELATIONS if relation_holds(a, rel, b)]
    return out


# --- referring expressions ---------------------------------------------------------------------------------


def resolve_expression(scene: Scene, expr: dict[str, Any]) -> list[int]:
    """Indices of the objects a structured expression picks out (category, color, place, landmark, position)."""
    objs = scene.objects

    def matches(o: Object, e: dict[str, Any]) -> bool:
        return (
            o.category == e["category"]
            and e.get("color") in (None, o.color)
            and e.get("place") in (None, o.place)
        )

    found = [i for i, o in enumerate(objs) if matches(o, expr)]
    if "landmark" in expr:
        marks = [j for j, o in enumerate(objs) if matches(o, expr["landmark"])]
        if len(marks) != 1:
            return []
        found = [i for i in found if i != marks[0] and relation_holds(objs[i], "next to", objs[marks[0]])]
    position = expr.get("position")
    if position and len(found) >= 2:
        order = sorted(found, key=lambda i: objs[i].cx, reverse=position == "right")
        first, second = objs[order[0]], objs[order[1]]
        clear = abs(first.cx - second.cx) >= 0.5 * min(first.width, second.width)
        found = [order[0]] if clear else []
    elif position:
        found = []
    return found


def expression_text(expr: dict[str, Any], group_size: int = 2) -> str:
    """The words of a structured expression: 'the red frisbee next to the dog', 'the leftmost tree'."""
    text = "the " + describe(expr["category"], expr.get("color"))
    position = expr.get("position")
    if position and group_size > 2:
        text = f"the {position}most " + text[4:]
    if expr.get("place"):
        text += " " + expr["place"]
    if "landmark" in expr:
        text += " next to the " + describe(expr["landmark"]["category"], expr["landmark"].get("color"))
    if position and group_size <= 2:
        text += f" on the {position}"
    return text


def _candidates(scene: Scene, i: int) -> list[dict[str, Any]]:
    """Structured expressions for object i, simplest first."""
    o = scene.objects[i]
    base = {"category": o.category}
    coloured = {**base, "color": o.color} if o.color else base
    out = [base, coloured]
    if o.place in ("in the air", "on the grass") and o.category in ("frisbee", "ball", "bird"):
        out.append({**coloured, "place": o.place})
    for j, other in enumerate(scene.objects):
        if j != i and other.category != o.category and relation_holds(o, "next to", other):
            for mark in ({"category": other.category}, {"category": other.category, "color": other.color}):
                if mark.get("color", 1) is not None:
                    out.append({**coloured, "landmark": mark})
    out += [{**coloured, "position": "left"}, {**coloured, "position": "right"}]
    return out


def referring_expressions(scene: Scene, limit: int = MAX_EXPRESSIONS) -> list[dict[str, Any]]:
    """Expressions that each pick out exactly one object, with `text`, `target`, `box` and the structure."""
    order = [i for i, o in enumerate(scene.objects) if o.category != "person"]
    order += [i for i, o in enumerate(scene.objects) if o.category == "person"]
    out: list[dict[str, Any]] = []
    for i in order:
        if len(out) >= limit:
            break
        found = [e for e in _candidates(scene, i) if resolve_expression(scene, e) == [i]]
        # the simplest unique expression, plus one through a landmark ("the red frisbee next to the dog")
        keep = found[:1]
        if found and "landmark" not in found[0]:
            keep += [e for e in found[1:] if "landmark" in e][:1]
        for expr in keep:
            group = len(
                [
                    o
                    for o in scene.objects
                    if o.category == expr["category"] and expr.get("color") in (None, o.color)
                ]
            )
            out.append(
                {
                    "text": expression_text(expr, group),
                    "target": i,
                    "box": list(scene.objects[i].box),
                    "expr": expr,
                }
            )
    return out[:limit]


# --- captions ----------------------------------------------------------------------------------------------

_CAPTION_ORDER = ("person", "dog", "frisbee", "ball", "car", "house", "bench", "bird", "flower", "tree")


def _join(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _group_phrase(category: str, objs: list[Object]) -> str:
    """'two red balls', 'three balls in red and blue', 'about 40 people in red, blue and white shirts'."""
    n = len(objs)
    colours = Counter(o.color for o in objs if o.color)
    counted = count_phrase(n, category, plural(category))
    if not colours:
        return counted
    if len(colours) == 1 and n <= 12:
        (color,) = colours
        return count_phrase(n, describe(category, color), describe(category, color, 2))
    names = _join(sorted(colours))  # a fixed order: the list reads as the set of colours
    return f"{counted} in {names} shirts" if category == "person" else f"{counted} in {names}"


def _where(scene: Scene, o: Object) -> str:
    third = scene.width / 3
    return "on the left" if o.cx < third else "on the right" if o.cx > 2 * third else "in the middle"


def _by_category(scene: Scene) -> dict[str, list[Object]]:
    groups: dict[str, list[Object]] = {c: [] for c in CATEGORIES}
    for o in scene.objects:
        groups[o.category].append(o)
    return groups


def caption(scene: Scene) -> str:
    """One sentence naming every category present with its count and colours."""
    groups = _by_category(scene)
    parts, used = [], set()
    dogs = groups["dog"]
    if len(dogs) == 1:
        d = dogs[0]
        text = f"a {d.color + ' ' if d.color else ''}dog {d.pose or 'standing'} on the grass"
        for cat in ("frisbee", "ball"):
            if len(groups[cat]) == 1 and relation_holds(d, "next to", groups[cat][0]):
                text += f" next to {count_phrase(1, describe(cat, groups[cat][0].color), '')}"
                used.add(cat)
                break
        parts.append(text)
        used.add("dog")
    for cat in _CAPTION_ORDER:
        if groups[cat] and cat not in used:
            phrase = _group_phrase(cat, groups[cat])
            if cat in ("frisbee", "ball", "bird") and all(o.place == "in the air" for o in groups[cat]):
                phrase += " in the air"
            parts.append(phrase)
    sky = [p for p in ("sun", "cloud") if groups[p]]
    if not parts and not sky:
        return "An empty " + ("street." if scene.background == "street" else "meadow under the sky.")
    if not parts:
        parts.append("an empty " + ("street" if scene.background == "street" else "meadow"))
    sentence = _join(parts)
    if scene.background == "street":
        sentence += " by a road"
    elif scene.background != "sky" and "on the grass" not in sentence:
        sentence += " on the grass"
    if groups["sun"] and groups["cloud"]:
        sentence += " under a sunny sky with " + count_phrase(len(groups["cloud"]), "cloud", "clouds")
    elif groups["sun"]:
        sentence += " under a sunny sky"
    elif groups["cloud"]:
        sentence += " under a sky with " + count_phrase(len(groups["cloud"]), "cloud", "clouds")
    return sentence[0].upper() + sentence[1:] + "."


def _sentence_for(scene: Scene, cat: str, objs: list[Object]) -> str:
    n = len(objs)
    colours = sorted({o.color for o in objs if o.color})
    if cat == "person" and n > 3:
        sizes = sorted(o.height for o in objs)
        depth = " Some stand close, others far away and small." if sizes[-1] > 2 * sizes[0] else ""
        shirts = f"{_join(colours)} shirts"
        return f"{count_phrase(n, 'person', 'people').capitalize()} stand on the grass in {shirts}.{depth}"
    if n > 3:
        tail = f" in {_join(colours)}" if colours else ""
        return f"There are {count_phrase(n, cat, plural(cat))}{tail}."
    out = []
    for o in sorted(objs, key=lambda o: o.cx):
        noun = describe(cat, o.color)
        verb = {
            "person": "stands",
            "tree": "stands",
            "dog": f"is {o.pose or 'standing'} on the grass",
            "car": "drives on the road" if o.place == "on the road" else "is parked on the grass",
            "house": "stands by the road" if scene.background == "street" else "stands in the distance",
            "bench": "stands on the grass",
            "flower": "grows on the grass",
        }.get(cat)
        if verb is None:  # frisbee, ball, bird
            flying = o.place == "in the air"
            verb = (
                ("flies in the air" if flying else "sits on the grass")
                if cat == "bird"
                else ("flies through the air" if flying else "lies on the grass")
            )
        out.append(f"{count_phrase(1, noun, '').capitalize()} {verb} {_where(scene, o)}.")
    return " ".join(out)


def paragraph(scene: Scene) -> str:
    """A few sentences: the setting, then each category with counts, colours, places and a key relation."""
    groups = _by_category(scene)
    setting = {
        "street": "The picture shows a street with a grey road, a strip of grass and the sky above.",
        "sky": "The picture shows the open sky.",
        "grass": "The picture shows a green meadow seen from above.",
    }.get(scene.background, "The picture shows a green meadow under a blue sky.")
    sentences = [setting]
    for cat in _CAPTION_ORDER:
        if groups[cat]:
            sentences.append(_sentence_for(scene, cat, groups[cat]))
    dogs, frisbees = groups["dog"], groups["frisbee"]
    if len(dogs) == 1 and len(frisbees) == 1 and relation_holds(dogs[0], "next to", frisbees[0]):
        sentences.append(f"The dog is next to the {describe('frisbee', frisbees[0].color)}.")
    if groups["sun"]:
        sentences.append(f"The sun shines {_where(scene, groups['sun'][0])} of the sky.")
    if groups["cloud"]:
        n = len(groups["cloud"])
        sentences.append(
            f"{count_phrase(n, 'white cloud', 'white clouds').capitalize()} {'floats' if n == 1 else 'float'} in the sky."
        )
    return " ".join(sentences)


def annotate(scene: Scene) -> dict[str, Any]:
    """The scene's dict plus counts, relations, caption, paragraph and referring expressions."""
    d = scene.to_dict()
    d["counts"] = scene.counts()
    d["relations"] = relations(scene)
    d["caption"] = caption(scene)
    d["paragraph"] = paragraph(scene)
    d["referring"] = referring_expressions(scene)
    return d
