"""Fictional names for gen-data worlds: pronounceable, unique, and never a prefix of one another.

No name is a prefix of another so that a greedy answer can be matched to one entity without ambiguity.
"""

import random

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


class NamePool:
    """Draws names from one seeded stream; all names drawn from a pool are distinct and prefix-free."""

    def __init__(self, rng: random.Random):
        self.rng = rng
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

    def person(self) -> str:
        while True:
            name = (self._syllable() + self._syllable()).capitalize()
            if self._accept(name):
                return name

    def place(self) -> str:
        while True:
            name = (self._syllable() + self.rng.choice(_PLACE_ENDINGS)).capitalize()
            if self._accept(name):
                return name

    def people(self, count: int) -> list[str]:
        return [self.person() for _ in range(count)]

    def places(self, count: int) -> list[str]:
        return [self.place() for _ in range(count)]
