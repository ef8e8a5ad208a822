"""Fictional names for gen-data worlds: pronounceable, unique, and never a prefix of one another.

No name is a prefix of another so that a greedy answer can be matched to one entity without ambiguity.
The syllables below make about 11,000 distinct place names and well over a million person names; a pool
that runs out raises UsageError instead of drawing forever (callers bound their counts well below that).
"""

import random

from lrtool.errors import UsageError

_ONSETS = [
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "st",
    "t",
    "th",
    "v",
    "z",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "m"]
_PLACE_ENDINGS = ["holm", "ford", "wick", "mere", "dale", "stead", "burg", "mouth", "vale", "haven"]


# Draws in a row that may be rejected (a repeat, or a prefix of or by an earlier name) before a pool gives up.
MAX_REJECTIONS = 10_000


class NamePool:
    """Draws names from one seeded stream; all names drawn from a pool are distinct and prefix-free."""

    def __init__(self, rng: random.Random, max_rejections: int = MAX_REJECTIONS):
        self.rng = rng
        self.max_rejections = max_rejections
        self.names: set[str] = set()
        self.prefixes: set[str] = set()

    def _syllable(self) -> str:
        return self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)

    def _accept(self, name: str) -> bool:
        if name in self.prefixes or any(name[:i] in self.names for i in range(1, len(name) + 1)):
            return False
        self.names.add(name)
        self.prefixes.update(name[:i] for i in range(1, len(name)))
        return True

    def _draw(self, kind: str, make) -> str:
        for _ in range(self.max_rejections + 1):
            name = make().capitalize()
            if self._accept(name):
                return name
        raise UsageError(
            f"ran out of distinct {kind} names: {self.max_rejections:,} draws in a row clashed with the "
            f"{len(self.names):,} names already drawn; ask for fewer names"
        )

    def person(self) -> str:
        return self._draw("person", lambda: self._syllable() + self._syllable())

    def place(self) -> str:
        return self._draw("place", lambda: self._syllable() + self.rng.choice(_PLACE_ENDINGS))

    def people(self, count: int) -> list[str]:
        return [self.person() for _ in range(count)]

    def places(self, count: int) -> list[str]:
        return [self.place() for _ in range(count)]
