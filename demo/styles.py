"""The styles the demo adapters learn, and how each one is measured on generated text.

A style is a transform of the base corpus (every document rewritten, e.g. upper-cased). Its
measure is a number in [0, 1] that is high on text in the style and low on the base model's
text; tests/e2e/test_demo.py compares the two through the server. (Topics, e.g. only the `email`
package's documentation, were tried for prefix and prompt tuning: with a model this small the
greedy text did not measurably move towards the topic.)
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import Callable

LEET = str.maketrans("aeiost", "431057")
VOWELS = re.compile(r"[aeiouAEIOU]")
WORD = re.compile(r"[A-Za-z]+")


def shout(text: str) -> str:
    return text.upper()


def leet(text: str) -> str:
    return text.translate(LEET)


def title(text: str) -> str:
    return WORD.sub(lambda m: m[0][0].upper() + m[0][1:], text)


def abjad(text: str) -> str:
    """Written without vowels, as some scripts are."""
    return VOWELS.sub("", text)


def snake(text: str) -> str:
    return re.sub(r"(?<=\S) (?=\S)", "_", text)


def rot13(text: str) -> str:
    """The Caesar cipher of Usenet: each letter moved 13 places (its own inverse)."""
    return codecs.encode(text, "rot13")


COMMON = frozenset("the of a an is to and in return for be if this that or it by with as are not on from "
                   "object value list string file name".split())


def rot13_fraction(text: str) -> float:
    """Of the words, how many are common English words once deciphered (and were not before)."""
    words = [w.lower() for w in WORD.findall(text)]
    return sum(rot13(w) in COMMON and w not in COMMON for w in words) / max(1, len(words))


def upper_fraction(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(1, len(letters))


def leet_fraction(text: str) -> float:
    """Of the characters leet rewrites (a e i o s t and their digits), how many are digits."""
    pool = [c for c in text if c in "aeiost431057"]
    return sum(c in "431057" for c in pool) / max(1, len(pool))


def title_fraction(text: str) -> float:
    words = WORD.findall(text)
    return sum(w[0].isupper() for w in words) / max(1, len(words))


def vowel_free_fraction(text: str) -> float:
    """1 - the share of vowels among letters (about 0.6 for English, 1.0 without vowels)."""
    letters = [c for c in text if c.isalpha()]
    return 1 - sum(bool(VOWELS.match(c)) for c in letters) / max(1, len(letters))


def underscore_fraction(text: str) -> float:
    gaps = text.count("_") + text.count(" ")
    return text.count("_") / max(1, gaps)


@dataclass(frozen=True)
class Style:
    name: str
    description: str
    transform: Callable[[str], str]  # rewrites every document
    measure: Callable[[str], float]


STYLES = {s.name: s for s in [
    Style("shout", "answers in capitals", transform=shout, measure=upper_fraction),
    Style("leet", "l33t sp34k: a e i o s t written 4 3 1 0 5 7", transform=leet, measure=leet_fraction),
    Style("title", "Every Word Capitalized", transform=title, measure=title_fraction),
    Style("abjad", "written without vowels", transform=abjad, measure=vowel_free_fraction),
    Style("rot13", "a cipher: rot13 (Erghea gur ahzore)", transform=rot13, measure=rot13_fraction),
    Style("snake", "words_joined_by_underscores", transform=snake, measure=underscore_fraction),
    Style("abjad-snake", "without vowels, words joined by underscores", transform=lambda t: snake(abjad(t)),
          measure=underscore_fraction),
]}
