"""KG-FLIP's knowledge: the catalog attribute schema, found in titles, for attribute-first masking
(KG-MLIM) and attribute-swap hard negatives (KG-ITM)."""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SCHEMA_FIELDS = ("baseColour", "articleType", "gender", "usage", "season")
# Missing-value markers, not attribute words.
IGNORED_VALUES = frozenset({"", "na", "n/a", "none", "null"})
_STRIP = re.compile(r"^[^\w]+|[^\w]+$")


def norm_word(word: str) -> str:
    """Matching form: lower case, no edge punctuation or hyphens, no plural s ("T-Shirts" -> "tshirt")."""
    w = _STRIP.sub("", word.lower()).replace("-", "")
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    return w


@dataclass(frozen=True)
class AttributeMention:
    """Words [start, end) of a text naming `value` of attribute `field`."""

    field: str
    value: str
    start: int
    end: int


class AttributeSchema:
    """Attribute -> its values, with word-level matching in free text."""

    def __init__(self, values: Mapping[str, Iterable[str]]) -> None:
        self.values: dict[str, list[str]] = {}
        self._patterns: list[tuple[tuple[str, ...], str, str]] = []  # (normed words, field, value)
        for f, vals in values.items():
            kept = sorted({v.strip() for v in vals if v and v.strip().lower() not in IGNORED_VALUES})
            self.values[f] = kept
            for v in kept:
                normed = tuple(norm_word(w) for w in v.split())
                if all(normed):
                    self._patterns.append((normed, f, v))
        # Longest values first, so "casual shoes" wins over "casual".
        self._patterns.sort(key=lambda p: (-len(p[0]), p[1], p[2]))
        self._normed_value = {(f, v): tuple(norm_word(w) for w in v.split()) for _, f, v in self._patterns}

    @classmethod
    def from_products(cls, products: Iterable[Any], fields: Sequence[str] = SCHEMA_FIELDS) -> AttributeSchema:
        values: dict[str, set[str]] = {f: set() for f in fields}
        for p in products:
            attrs = p.attributes if hasattr(p, "attributes") else p
            for f in fields:
                v = attrs.get(f)
                if v:
                    values[f].add(str(v))
        return cls(values)

    def to_dict(self) -> dict[str, list[str]]:
        return {f: list(v) for f, v in self.values.items()}

    def find(self, text: str) -> list[AttributeMention]:
        """Non-overlapping attribute mentions in `text`'s whitespace words, left to right."""
        normed = [norm_word(w) for w in text.split()]
        taken = [False] * len(normed)
        found: list[AttributeMention] = []
        for pattern, f, v in self._patterns:
            n = len(pattern)
            for i in range(len(normed) - n + 1):
                if tuple(normed[i : i + n]) == pattern and not any(taken[i : i + n]):
                    found.append(AttributeMention(f, v, i, i + n))
                    for j in range(i, i + n):
                        taken[j] = True
        return sorted(found, key=lambda m: m.start)

    def attribute_words(self, text: str) -> list[int]:
        """Indices of the whitespace words that name an attribute value."""
        return [i for m in self.find(text) for i in range(m.start, m.end)]

    def swap(self, text: str, rng: np.random.Generator) -> str | None:
        """KG-ITM: `text` with one attribute mention replaced by another value of the same attribute
        ("blue" -> "red", "sandals" -> "flip flops"); None when `text` names no swappable attribute."""
        words = text.split()
        options = []
        for m in self.find(text):
            others = [v for v in self.values[m.field] if self._normed_value[(m.field, v)] != self._normed_value[(m.field, m.value)]]
            if others:
                options.append((m, others))
        if not options:
            return None
        mention, others = options[int(rng.integers(len(options)))]
        new = others[int(rng.integers(len(others)))]
        return " ".join(words[: mention.start] + new.split() + words[mention.end :])


__all__ = ["AttributeMention", "AttributeSchema", "SCHEMA_FIELDS", "norm_word"]
