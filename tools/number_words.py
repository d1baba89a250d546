"""English number words: read them ('eight' -> 8, 'twenty-five' -> 25, 'a dozen' -> 12) and write them (8 -> 'eight').

The one place the project keeps its number words: the count-change parser (count_change.py), the diffusion
prompt parser (layout_diffusion.counts_in_prompt) and the world's text (finetune) read and write through here.
Cardinals ('zero' to 'ninety-nine', with 'hundred', 'thousand' and 'million' as multipliers: 'two hundred and
five' -> 205, 'ten thousand' -> 10000), 'a dozen', 'a couple (of)' and 'a pair (of)'; no ordinals, no fractions. This module knows words and digits only; nothing of images, models or what is being counted.
"""

from __future__ import annotations

import re

UNITS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)  # fmt: skip
TENS: dict[str, int] = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
}  # fmt: skip
# every single word (or fixed phrase) that names a number, with its value
WORD_VALUES: dict[str, int] = {w: i for i, w in enumerate(UNITS)} | TENS | {"a dozen": 12, "dozen": 12}

_COMPOUND = re.compile(rf"\b({'|'.join(TENS)})[\s-]+({'|'.join(UNITS[1:10])})\b")
_SINGLE = re.compile(r"\b(" + "|".join(sorted(WORD_VALUES, key=len, reverse=True)) + r")\b")
_PAIRS = re.compile(r"\b(a couple of|a couple|a pair of|a pair)\b")
_NUMBER = re.compile(r"\b\d+\b")
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1000000}
_A_SCALE = re.compile(r"\b(?:a|one)\s+(hundred|thousand|million)\b")
# '2 hundred and 5', '10 thousand': applied hundred first, so '2 thousand 3 hundred' -> '2 thousand 300' -> 2300
_SCALED = {
    word: re.compile(rf"\b(\d+)\s+{word}(?:\s+(?:and\s+)?(\d+)(?!\s+(?:hundred|thousand|million)))?\b")
    for word in _SCALES
}


def words_to_digits(text: str) -> str:
    """`text` lower-cased, spaces collapsed, number words as digits ('Twenty-five dogs' -> '25 dogs')."""
    text = " ".join(text.lower().split())
    text = _COMPOUND.sub(lambda m: str(TENS[m.group(1)] + UNITS.index(m.group(2))), text)
    text = _PAIRS.sub("2", text)
    text = _A_SCALE.sub(r"1 \1", text)
    text = _SINGLE.sub(lambda m: str(WORD_VALUES[m.group(1)]), text)
    for word, scale in _SCALES.items():
        text = _SCALED[word].sub(lambda m, s=scale: str(int(m.group(1)) * s + int(m.group(2) or 0)), text)
    return text


def parse_number(text: str) -> int | None:
    """The whole of `text` as a count ('8', 'eight', 'twenty-one', 'a dozen'); None when it is not one."""
    digits = words_to_digits(text).strip()
    return int(digits) if digits.isdigit() else None


def first_number(text: str) -> int | None:
    """The first count in `text`, in digits or words ('I see eight dogs' -> 8); None when there is none."""
    found = _NUMBER.search(words_to_digits(text))
    return int(found.group()) if found else None


def number_word(n: int) -> str:
    """`n` in words for 0 <= n < 100 ('eight', 'twenty-one'); digits from 100 on."""
    if n < 0:
        raise ValueError(f"number_word takes a count (>= 0), got {n}")
    if n < len(UNITS):
        return UNITS[n]
    if n < 100:
        tens = next(w for w, v in TENS.items() if v == n // 10 * 10)
        return tens if n % 10 == 0 else f"{tens}-{UNITS[n % 10]}"
    return str(n)
