"""Count changes in words: what a user says ("twice as many", "an extra four") is read as the tool's arithmetic."""

from __future__ import annotations

import pytest

from toolvlm.tools.base import ToolInputError
from toolvlm.tools.count_change import MAX_COUNT, CountChange, numbers_in_words, parse_change, target_count
from toolvlm.tools.layout import Layout, edit_layout

WORDS = [
    ("double the amount of people", "x", 2),
    ("Twice as many dogs", "x", 2),
    ("two times the people", "x", 2),
    ("the people doubled", "x", 2),
    ("triple the number of dogs", "x", 3),
    ("three times more trees", "x", 3),
    ("four times as many cars", "x", 4),
    ("1.5 times as many people", "x", 1.5),
    ("2x the people", "x", 2),
    ("half the people", "x", 0.5),
    ("an extra 4 dogs", "+", 4),
    ("an extra dog", "+", 1),
    ("another 3 birds", "+", 3),
    ("three more people", "+", 3),
    ("5 additional people", "+", 5),
    ("a couple more dogs", "+", 2),
    ("add twenty-five people", "+", 25),
    ("two fewer birds", "-", 2),
    ("remove 2 people", "-", 2),
    ("exactly 10 people", "=", 10),
    ("only four dogs", "=", 4),
    ("12 people in total", "=", 12),
    ("a dozen people", "=", 12),
    ("no dogs", "=", 0),
    ("without the trees", "=", 0),
    ("7 people", "=", 7),
]


@pytest.mark.parametrize(("words", "op", "number"), WORDS)
def test_words_read_as_the_change_they_say(words, op, number):
    assert parse_change(words) == CountChange(op, float(number))


def test_symbols_and_numbers_read_as_before_and_words_agree_with_them():
    assert parse_change(2) == parse_change("x2") == parse_change("twice as many people")
    assert parse_change("+3") == parse_change("3 more") == parse_change("an extra three")
    assert parse_change("=10") == parse_change("exactly ten")
    assert target_count("double the people", 27) == 54
    assert target_count("two fewer", 1) == 0  # never below zero
    assert target_count("half the dogs", 5) == 2


def test_number_words_become_digits_inside_words_only():
    assert numbers_in_words("Twenty-five people and a dozen dogs") == "25 people and 12 dogs"
    assert numbers_in_words("someone often") == "someone often"  # 'one', 'ten' inside words stay


@pytest.mark.parametrize("bad", ["lots of people", "", "more people", "people", True])
def test_unreadable_changes_are_input_errors_that_say_what_works(bad):
    with pytest.raises(ToolInputError, match="double|x2|number"):
        parse_change(bad)


def test_negative_factors_and_huge_targets_are_input_errors_that_say_what_to_do():
    with pytest.raises(ToolInputError, match="cannot be negative.*'-5'"):
        parse_change(-5)  # a factor of -5 would silently empty the scene
    assert parse_change(0) == CountChange("x", 0.0)  # a factor of 0 removes all, as asked
    with pytest.raises(ToolInputError, match="finite"):
        parse_change(float("nan"))
    for change in ("=10000", 1000, "+500", "ten thousand people in total"):
        with pytest.raises(ToolInputError, match=f"at most {MAX_COUNT}"):
            target_count(change, 3)
    assert target_count(f"={MAX_COUNT}", 3) == MAX_COUNT


def test_removing_more_than_there_are_is_noted():
    layout = Layout(100, 100, [[0, 50, 10, 80], [20, 50, 30, 80]], ["person", "person"])
    edited, notes = edit_layout(layout, {"person": "-5"})
    assert edited.counts() == {} and notes == [
        "asked to remove 5 'person' but the reference has 2: all removed"
    ]


def test_edit_layout_takes_words_and_notes_a_factor_on_an_absent_label():
    layout = Layout(100, 100, [[0, 50, 10, 80], [20, 50, 30, 80]], ["person", "person"])
    edited, notes = edit_layout(layout, {"person": "three more people", "dog": "twice as many dogs"}, seed=1)
    assert edited.counts() == {"person": 5} and "factor changes nothing" in notes[0]
