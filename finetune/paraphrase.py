"""A paraphrase grammar for the user requests of world conversations: many ways to ask for one thing.

A request is composed from parts: an opener ("Please", "Could you", "I'd like you to", ...), a core phrase of
the task (an imperative such as "draw a box around {x}", or a question such as "Where is {x}?"), a name for the
image ("the image", "this photo", "the scene", ...) and a closer (", please", " for me", ...). The parts agree
(a question opener ends with "?", a question core takes no opener), so every product is a sentence. Thousands of
requests per task come out of a few dozen parts, where the hand-written template lists of `build_world` hold a
dozen each; a controller trained on both learns what a request asks for rather than a set of strings.

Only the *train* phrasings use the grammar. The held-out templates of `build_world` stay apart: `request` never
returns a text equal to one of them. The distribution-shift evaluation's phrasings are written elsewhere, and
this module must never import them (nor they this one).

It knows words; not scenes, tools or models.
"""

from __future__ import annotations

import random
from collections.abc import Collection

IMAGE_NAMES = (
    "the image", "this image", "the picture", "this picture", "the photo", "this photo", "the scene",
    "this scene", "the img", "img_0",
)  # fmt: skip
# openers of an imperative: (text, makes a question)
OPENERS = (
    ("", False), ("", False), ("", False), ("Please ", False), ("Could you ", True), ("Can you ", True),
    ("Would you ", True), ("Will you ", True), ("I'd like you to ", False), ("I want you to ", False),
    ("I need you to ", False), ("Go ahead and ", False), ("Kindly ", False),
    ("Hey, ", False), ("Now ", False), ("Okay, ", False), ("Could you please ", True),
    ("Would you be able to ", True), ("Is it possible to ", True), ("Let's ", False),
)  # fmt: skip
CLOSERS = ("", "", "", "", ", please", " for me", " if you can", ", thanks", " now", " quickly")

# Core phrases per request kind: imperatives (lower-case start) and questions (end with "?"). Slots: {x} an
# object phrase (ground: "the red car"; count / ground_all: a plural "people"; exists / colour: a noun "dog"),
# {img} a name of the image, {c} a change in counts ("twice as many people").
IMPERATIVES: dict[str, tuple[str, ...]] = {
    "describe": (
        "describe {img}", "tell me what you see in {img}", "tell me what is in {img}",
        "give me a description of {img}", "explain what {img} shows", "summarize what is in {img}",
        "list what you can see in {img}", "say what {img} contains", "walk me through {img}",
        "tell me about {img}", "describe what is going on in {img}", "give me an overview of {img}",
        "write a description of {img}", "describe everything in {img}", "tell me what {img} contains",
    ),
    "caption": (
        "caption {img}", "write a caption for {img}", "give {img} a short caption", "sum up {img} in a sentence",
        "write one sentence about {img}", "give me a one-line caption of {img}", "title {img} in one sentence",
    ),
    "exists": (
        "check whether there is a {x} in {img}", "check if {img} has a {x}", "tell me whether there is a {x}",
        "find out if there is a {x} in {img}", "see if you can spot a {x}", "look for a {x} in {img}",
        "tell me if {img} contains a {x}", "check for a {x}", "confirm whether a {x} appears in {img}",
    ),
    "colour": (
        "tell me what colour the {x} is", "tell me the color of the {x}", "name the colour of the {x}",
        "say which colour the {x} has",
    ),
    "ground": (
        "put a box around {x}", "draw a box around {x}", "draw a bounding box around {x}", "box {x}",
        "find {x}", "locate {x}", "mark {x}", "show me {x}", "show me where {x} is", "highlight {x}",
        "outline {x}", "point to {x}", "indicate {x} with a box", "detect {x}", "frame {x} with a rectangle",
        "give me the box of {x}", "give me the coordinates of {x}", "find the position of {x}",
        "tell me where {x} is", "put a rectangle around {x}", "mark where {x} is in {img}",
        "find {x} in {img}", "locate {x} in {img}", "draw a box around {x} in {img}", "spot {x}",
        "box {x} in {img}", "get me a bounding box for {x}", "find and box {x}",
    ),
    "ground_all": (
        "put boxes around all the {x}", "box every one of the {x}", "find all the {x}", "locate all {x}",
        "draw bounding boxes around the {x}", "mark each of the {x}", "detect all the {x} in {img}",
        "highlight every {x} in {img}", "show me all the {x}", "find every one of the {x} in {img}",
    ),
    "count": (
        "count the {x}", "count the {x} in {img}", "count the number of {x}", "tell me how many {x} there are",
        "give me a count of the {x}", "estimate the number of {x}", "find out how many {x} are in {img}",
        "report the number of {x}", "tell me the number of {x} in {img}", "count how many {x} {img} shows",
        "work out how many {x} there are", "figure out the number of {x}", "count all the {x}",
        "give me the number of {x} in {img}", "estimate how many {x} are in {img}",
    ),
    "generate": (
        "generate a similar image with {c}", "make a similar picture with {c}", "create a new version of {img} with {c}",
        "redraw {img} with {c}", "render the scene again with {c}", "produce an image like {img} but with {c}",
        "edit {img} so that it has {c}", "change {img} to have {c}", "draw the same scene with {c}",
        "generate a new image based on {img} with {c}", "make a copy of {img} with {c}",
        "create a variation of {img} with {c}", "regenerate {img} with {c}",
        "keep the layout of {img} and generate it with {c}", "use {img} as a reference and make one with {c}",
        "make {img} again, but with {c}", "synthesize a similar scene with {c}",
        "modify {img} so there are {c}", "generate a picture like this with {c}",
    ),
}  # fmt: skip
QUESTIONS: dict[str, tuple[str, ...]] = {
    "describe": (
        "What do you see in {img}?", "What is in {img}?", "What does {img} show?", "What's happening in {img}?",
        "What can be seen in {img}?", "Which objects are in {img}?", "What objects does {img} contain?",
        "What's in {img}?", "What is going on in {img}?", "What does {img} contain?", "What is shown in {img}?",
    ),
    "caption": ("What is a good one-line caption for {img}?", "How would you caption {img}?"),
    "exists": (
        "Is there a {x} in {img}?", "Is there any {x}?", "Does {img} contain a {x}?", "Does {img} have a {x} in it?",
        "Can you see a {x}?", "Do you see any {x}?", "Is a {x} present?", "Is a {x} visible?",
        "Is there a {x} anywhere?", "Any {x} in {img}?", "Does {img} show a {x}?", "Is there a {x} here?",
    ),
    "colour": (
        "What colour is the {x}?", "What color is the {x}?", "Which colour is the {x}?",
        "What's the colour of the {x}?", "What color does the {x} have?",
    ),
    "ground": (
        "Where is {x}?", "Where is {x} in {img}?", "Where exactly is {x}?", "Where can I find {x}?",
        "Which part of {img} shows {x}?", "Where's {x}?",
    ),
    "ground_all": ("Where are all the {x}?", "Where are the {x} in {img}?"),
    "count": (
        "How many {x} are there?", "How many {x} are in {img}?", "How many {x} can you count?",
        "What is the number of {x}?", "What's the count of {x} in {img}?", "How many {x} do you see?",
        "How many {x} does {img} show?", "How many {x} are visible?", "How many {x} can be seen in {img}?",
        "What's the number of {x} here?", "Number of {x} in {img}?",
    ),
    "generate": (
        "Can you generate a similar image with {c}?", "Could you make a version of {img} with {c}?",
        "What would {img} look like with {c}? Generate it.", "How about a similar image with {c}?",
    ),
}  # fmt: skip
KINDS = tuple(IMPERATIVES)


def request(kind: str, rng: random.Random, avoid: Collection[str] = (), **fill: str) -> str:
    """A random request of `kind` with its slots filled; never one of the texts in `avoid`."""
    if kind not in IMPERATIVES:
        raise ValueError(f"unknown request kind {kind!r}; kinds are: {', '.join(KINDS)}")
    for _ in range(20):
        text = _compose(kind, rng, fill)
        if text not in avoid:
            return text
    raise RuntimeError(f"20 requests of kind {kind!r} in a row were texts to avoid")


def _compose(kind: str, rng: random.Random, fill: dict[str, str]) -> str:
    slots = {"img": rng.choice(IMAGE_NAMES), **fill}
    if rng.random() < 0.3:
        text = rng.choice(QUESTIONS[kind]).format(**slots)
        return _capital(("Hey, " if rng.random() < 0.1 else "") + text)
    opener, asks = rng.choice(OPENERS)
    core = rng.choice(IMPERATIVES[kind]).format(**slots)
    closer = rng.choice(CLOSERS)
    return _capital(f"{opener}{core}{closer}{'?' if asks else '.'}")


def _capital(text: str) -> str:
    return text[0].upper() + text[1:]
