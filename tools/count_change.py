"""Count changes for "a similar image": read a requested change in an object's count, in symbols or in words.

A change is a factor (2, "x2", "double", "twice as many", "three times the", "half"), an offset ("+3", "-2",
"3 more", "an extra four", "two fewer", "remove 2") or a target ("=10", "exactly 10", "only four", "no dogs",
"10 in total"). Words are read so that a controller can pass on the user's own words for the change
(`{"person": "double the amount of people"}`) instead of translating them into a symbol, which small
controllers get wrong for wordings they were not trained on. Nouns and filler words are ignored.

This module knows English count words and arithmetic on counts; nothing of images or models.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from toolvlm.tools.base import ToolInputError
from toolvlm.tools.number_words import words_to_digits

SYMBOLIC = re.compile(r"^\s*(?P<op>[x*+\-=]?)\s*(?P<num>\d+(\.\d*)?|\.\d+)\s*$")
# the most instances of one object a change may ask for: more is no picture a layout model can draw, and placing
# them one by one would run for minutes (`{"person": "=10000"}`)
MAX_COUNT = 200
N = r"(\d+(?:\.\d+)?)"
_REMOVE = r"(?:remove|minus|take away|subtract|delete|drop|without|lose|get rid of|leave out)"

# (pattern, op, number when the pattern has no group); first match wins, so the specific come before the general
_RULES: list[tuple[re.Pattern[str], str, float | None]] = [
    (re.compile(rf"\b{N}\s+(?:fewer|less)\b"), "-", None),
    (re.compile(rf"\b{_REMOVE}\s+(?:only\s+|just\s+)?{N}\b"), "-", None),
    (re.compile(r"\b(?:no|none|zero|without|remove all|remove the|take away the|get rid of)\b"), "=", 0.0),
    (re.compile(rf"\b{N}\s+(?:more|extra|additional|added|new|further)\b"), "+", None),
    (re.compile(rf"\b(?:add|plus|another|extra|additional|further)\s+{N}\b"), "+", None),
    (re.compile(r"\b(?:an? extra|another|an? additional|one more|add an?|plus an?)\b"), "+", 1.0),
    (re.compile(rf"\b(?:exactly|only|just|precisely|a total of|total of|set to|make it)\s+{N}\b"), "=", None),
    (re.compile(rf"\b{N}\b.*\b(?:in total|in all|total|altogether|overall)\b"), "=", None),
    (re.compile(rf"\b{N}\s*(?:x|times|fold|-fold)\b"), "x", None),
    (re.compile(rf"\bx\s*{N}\b"), "x", None),
    (re.compile(r"\b(?:double|doubled|doubling|twice)\b"), "x", 2.0),
    (re.compile(r"\b(?:triple|tripled|tripling|treble|trebled|thrice)\b"), "x", 3.0),
    (re.compile(r"\b(?:quadruple|quadrupled|quadrupling)\b"), "x", 4.0),
    (re.compile(r"\b(?:quintuple|quintupled)\b"), "x", 5.0),
    (re.compile(r"\b(?:half|halve|halved|halving)\b"), "x", 0.5),
    (re.compile(r"\ba third\b"), "x", 1 / 3),
    (re.compile(r"\ba quarter\b"), "x", 0.25),
    (re.compile(rf"^\D*{N}\D*$"), "=", None),  # one bare number: "10 people"
]


@dataclass(frozen=True)
class CountChange:
    """A parsed change: `op` is "x" (factor), "+", "-" (offset) or "=" (target), with its number."""

    op: str
    number: float

    def apply(self, current: int) -> int:
        """The count after this change to `current`; ToolInputError past MAX_COUNT."""
        if self.op == "x":
            target = current * self.number
        elif self.op == "+":
            target = current + self.number
        elif self.op == "-":
            target = current - self.number
        else:
            target = self.number
        if target > MAX_COUNT:
            raise ToolInputError(
                f"the change {self.text()} would make {target:g} of an object (from {current}); at most "
                f"{MAX_COUNT} of one object can be drawn"
            )
        return max(0, round(target))

    def text(self) -> str:
        """The change in symbols ('x2', '+3', '=10')."""
        return f"{self.op}{self.number:g}"


def numbers_in_words(text: str) -> str:
    """`text` lower-cased with number words as digits ('twenty-five' -> '25', 'a dozen' -> '12')."""
    return words_to_digits(text)


def parse_change(change: float | int | str) -> CountChange:
    """A count change from a number (a factor), a symbol ('x2', '+3', '-2', '=10') or words ('twice as many')."""
    if isinstance(change, bool):
        raise ToolInputError(
            f"a count change must be a number or text like 'x2', '+3', '=10' or 'double', got {change!r}"
        )
    if isinstance(change, int | float):
        if not math.isfinite(change):
            raise ToolInputError(f"a count change must be a finite number, got {change!r}")
        if change < 0:  # read as a factor it would silently empty the scene
            raise ToolInputError(
                f"a count factor cannot be negative ({change:g}); to remove {-change:g}, pass '-{-change:g}' "
                f"(a string) or '{-change:g} fewer'; to remove all, pass '=0'"
            )
        return CountChange("x", float(change))
    text = str(change)
    match = SYMBOLIC.match(text)
    if match:
        op = {"*": "x", "": "x"}.get(match.group("op"), match.group("op"))
        return CountChange(op, float(match.group("num")))
    words = numbers_in_words(text).strip(" .!?")
    for pattern, op, fixed in _RULES:
        found = pattern.search(words)
        if found:
            return CountChange(op, fixed if fixed is not None else float(found.group(1)))
    raise ToolInputError(
        f"cannot read the count change {change!r}; use a factor (2, 'x2', 'double'), an offset ('+3', "
        "'3 more', '-2', '2 fewer') or a target ('=10', 'exactly 10')"
    )


def target_count(change: float | int | str, current: int) -> int:
    """The count after a change to `current`: a factor, an offset or a target, in symbols or words."""
    return parse_change(change).apply(current)
