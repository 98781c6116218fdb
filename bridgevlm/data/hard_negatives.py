"""Hard-negative captions by swapping one attribute word (NegCLIP, Yuksekgonul et al. 2023).

Contrastive training takes shortcuts: if colours and positions already tell the captions in a
batch apart, nothing rewards seeing shape. A caption with exactly one word swapped for another of
its class ("red" -> "blue", "circle" -> "star") is a negative that only the swapped attribute can
reject. The word classes are data: each dataset names its own (empty means no hard negatives).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

_WORD = re.compile(r"[A-Za-z]+")


@dataclass
class WordSwapNegatives:
    word_classes: Sequence[Sequence[str]]
    seed: int = 0

    def __post_init__(self):
        self._class_of = {}
        for index, words in enumerate(self.word_classes):
            if len(set(words)) < 2:
                raise ValueError(f"hard-negative word class {index} needs at least two distinct words, got {list(words)}")
            for word in words:
                if word.lower() in self._class_of:
                    raise ValueError(f"word {word!r} is in two hard-negative word classes")
                self._class_of[word.lower()] = [w.lower() for w in words]

    def __call__(self, caption: str, index: int) -> str | None:
        """A negative for sample `index` (the same one every epoch), or None if no word can be swapped."""
        spots = [m for m in _WORD.finditer(caption) if m.group().lower() in self._class_of]
        if not spots:
            return None
        rng = np.random.default_rng([self.seed, index])
        spot = spots[rng.integers(len(spots))]
        word = spot.group()
        options = [w for w in self._class_of[word.lower()] if w != word.lower()]
        swap = options[rng.integers(len(options))]
        if word[0].isupper():
            swap = swap.capitalize()
        return caption[: spot.start()] + swap + caption[spot.end():]
