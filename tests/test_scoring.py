"""Answer normalisation and exact match (no Ray, no model)."""

import pytest

from jobs.evaluation.scoring import exact_match, first_line, normalize_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Red", "red"),
        ("  RED.  ", "red"),
        ("The red one", "red 1"),
        ("a square", "square"),
        ("An apple!", "apple"),
        ("two", "2"),
        ("Three.", "3"),
        ("none", "0"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("top-left", "top left"),
        ("don't", "dont"),
        ("yes, it is", "yes it is"),
        ("line\tbreak\nhere", "line break here"),
        ("...", ""),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_number_words_and_digits_match_both_ways():
    assert exact_match("2", "two")
    assert exact_match("two", "2")
    assert exact_match("Twelve", "12")
    assert not exact_match("3", "two")


def test_exact_match_ignores_case_punctuation_articles_whitespace():
    assert exact_match("The Blue.", "blue")
    assert exact_match("  topleft ", "topleft")
    assert exact_match("left", "Left")


def test_exact_match_is_exact_after_normalisation():
    assert not exact_match("blue sky", "blue")  # extra words are wrong, not partial credit
    assert not exact_match("blu", "blue")
    assert not exact_match("", "blue")
    assert not exact_match("", "")  # an empty reference cannot be scored as correct


def test_only_the_first_line_of_a_generation_is_judged():
    assert first_line("\n\n red\nthe rest") == "red"
    assert exact_match("red\nbecause the shape is red", "red")
    assert not exact_match("because\nred", "red")


def test_any_of_several_references_counts():
    assert exact_match("2", ["two", "2 shapes"])
    assert exact_match("2 shapes", ["two", "2 shapes"])
    assert not exact_match("3", ["two", "2 shapes"])
