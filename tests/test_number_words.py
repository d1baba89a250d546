"""Number words, read and written in one place: 'eight dogs' -> 8, in the tools that read a user's counts."""

from __future__ import annotations

import pytest

from toolvlm.tools.number_words import first_number, number_word, parse_number, words_to_digits


@pytest.mark.parametrize(
    ("text", "digits"),
    [
        ("eight dogs", "8 dogs"),
        ("Twenty-five people and a dozen dogs", "25 people and 12 dogs"),
        ("twenty five birds", "25 birds"),
        ("a couple of trees", "2 trees"),
        ("two hundred and five people", "205 people"),
        ("a hundred birds", "100 birds"),
        ("ten thousand people", "10000 people"),
        ("three thousand two hundred and one", "3201"),
        ("someone often", "someone often"),  # 'one' and 'ten' inside words stay
        ("hundreds of people", "hundreds of people"),  # no number to scale
    ],
)
def test_words_become_digits(text, digits):
    assert words_to_digits(text) == digits


def test_parse_and_find_numbers():
    assert parse_number("eight") == 8 and parse_number("twenty-one") == 21 and parse_number(" 12 ") == 12
    assert parse_number("dogs") is None and parse_number("eight dogs") is None
    assert first_number("I see eight dogs and 3 trees") == 8
    assert first_number("There are no dogs.") is None


def test_words_written_read_back_as_the_same_number():
    assert [number_word(n) for n in (0, 8, 13, 20, 21, 99)] == [
        "zero", "eight", "thirteen", "twenty", "twenty-one", "ninety-nine"
    ]  # fmt: skip
    assert all(parse_number(number_word(n)) == n for n in range(150))
    with pytest.raises(ValueError, match="count"):
        number_word(-1)


def test_the_diffusion_prompt_parser_reads_number_words(tiny_models):
    from toolvlm.tools.layout_diffusion import LayoutDiffusion, counts_in_prompt

    model = LayoutDiffusion.from_pretrained(tiny_models("inhouse_generator"))  # knows person, tree, dog
    assert counts_in_prompt("eight dogs", model) == {"dog": 8}
    assert counts_in_prompt("Twenty-five people, a tree and two dogs", model) == {
        "person": 25,
        "tree": 1,
        "dog": 2,
    }
    assert counts_in_prompt("a dozen trees", model) == {"tree": 12}


pytest_plugins = ["fixtures_tools"]  # fixtures: tiny_models
