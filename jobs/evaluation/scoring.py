"""Answer normalisation and exact-match scoring for short-answer VQA-style evaluation.

:func:`normalize_answer` follows the common VQA normalisation (the official VQA evaluation script's
``processPunctuation`` / ``processDigitArticle``), written from its description:

1. lowercase; newlines and tabs become spaces;
2. punctuation: a comma between digits is dropped (``1,000`` -> ``1000``); a period that is not a
   decimal point (``3.5`` keeps it) is removed; every other punctuation character is removed, and
   becomes a space where it joins two words (``top-left`` -> ``top left``; apostrophes are
   removed without a space: ``don't`` -> ``dont``);
3. number words become digits (``zero``..``twenty``, ``thirty`` .. ``ninety``, ``hundred``,
   ``thousand``; ``none`` -> ``0``, as in VQA), so ``"two"`` and ``"2"`` match;
4. the articles ``a``, ``an``, ``the`` are dropped;
5. whitespace is collapsed to single spaces and stripped.

A generated answer is cut at its first line break before normalisation (a model that goes on after
its answer is judged on the answer). Exact match compares the normalised strings; a reference may
be a list of acceptable answers (VQA's several annotators), any of which counts.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "eleven": "11",
    "twelve": "12",
    "thirteen": "13",
    "fourteen": "14",
    "fifteen": "15",
    "sixteen": "16",
    "seventeen": "17",
    "eighteen": "18",
    "nineteen": "19",
    "twenty": "20",
    "thirty": "30",
    "forty": "40",
    "fifty": "50",
    "sixty": "60",
    "seventy": "70",
    "eighty": "80",
    "ninety": "90",
    "hundred": "100",
    "thousand": "1000",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

_COMMA_IN_NUMBER = re.compile(r"(?<=\d),(?=\d)")
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_APOSTROPHES = re.compile(r"['\u2019`]")
_DECIMAL_MARK = "\x00"  # placeholder that survives punctuation removal
_PUNCTUATION = re.compile("[" + re.escape(string.punctuation) + "\u2018\u201c\u201d\u2013\u2014\u2026]")


def normalize_answer(text: str) -> str:
    """Normalise an answer string for exact match (rules in the module docstring).

    Args:
        text: a reference or a generated answer.

    Returns:
        The normalised answer; ``""`` for an empty or punctuation-only answer.
    """
    text = str(text).lower().replace("\n", " ").replace("\t", " ")
    text = _COMMA_IN_NUMBER.sub("", text)
    text = _DECIMAL_POINT.sub(_DECIMAL_MARK, text)
    text = _APOSTROPHES.sub("", text)
    text = _PUNCTUATION.sub(" ", text).replace(_DECIMAL_MARK, ".")
    words = [NUMBER_WORDS.get(word, word) for word in text.split()]
    return " ".join(word for word in words if word not in ARTICLES)


def first_line(generated: str) -> str:
    """The generated text up to its first non-empty line break (the answer a model gave)."""
    for line in str(generated).strip().splitlines():
        if line.strip():
            return line
    return ""


def exact_match(prediction: str, reference: str | Sequence[str]) -> bool:
    """Whether a generated answer matches the reference after normalisation.

    Args:
        prediction: generated text (only its first line is judged).
        reference: the reference answer, or a list of acceptable answers.

    Returns:
        True when the normalised prediction equals a normalised reference. An empty reference
        never matches (a sample without an answer cannot be scored).
    """
    references = [reference] if isinstance(reference, str) else list(reference)
    predicted = normalize_answer(first_line(prediction))
    return any(predicted == normalize_answer(r) for r in references if normalize_answer(r))


__all__ = ["ARTICLES", "NUMBER_WORDS", "exact_match", "first_line", "normalize_answer"]
