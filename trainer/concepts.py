"""FashionMMKG-style concept graph built from training titles and attributes, without a POS tagger.

Concepts are lower-case phrases of two kinds:
  * attribute values (baseColour, articleType, usage, season, gender): the catalog's own schema,
    kept whatever their count;
  * title phrases: Myntra-style titles read "Brand [Gender] modifiers... Head", ending in their
    head noun, so the head noun phrase and its modifier chain are the title's suffix n-grams
    ("jersey" ⊂ "cricket jersey" ⊂ "indian cricket jersey"), up to `max_ngram` words, kept when
    at least `min_count` titles end with them and they are more than brand words, stopwords
    and numbers.

is-a edges (child -> hypernym):
  * a title phrase is-a its longest shorter suffix that is a concept;
  * any concept is-a every attribute-value concept whose words it contains ("navy blue backpack"
    is-a "navy blue"); words match up to a plural "s" and hyphens ("t-shirts" ~ "tshirt").
Each text's concept set includes all hypernyms of its concepts.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ATTRIBUTE_FIELDS = ("baseColour", "articleType", "usage", "season", "gender")
GENDER_WORDS = frozenset({"men", "mens", "women", "womens", "boys", "girls", "unisex", "kids", "baby", "infant"})
STOPWORDS = frozenset(
    "a an and as at by for from in into of on or the to with without & + - n".split()
)
_WORD = re.compile(r"[a-z0-9]+(?:[-'.&][a-z0-9]+)*")
PHRASE = "phrase"
ATTRIBUTE = "attribute"
CONCEPT_PROMPT = "a photo of {}"  # how a concept phrase is put to the text tower
# Concepts a photo can show (not gender, season or year): the ones CVA aligns with images.
VISUAL_CONCEPT_KINDS = frozenset({PHRASE, f"{ATTRIBUTE}:baseColour", f"{ATTRIBUTE}:articleType", f"{ATTRIBUTE}:usage"})


def words(text: str) -> list[str]:
    """Lower-case word tokens; hyphenated words ("t-shirt") and initialisms ("u.s") stay whole."""
    return _WORD.findall(text.lower())


def _norm(word: str) -> str:
    """Matching form of a word: no hyphens, no plural s ("t-shirts" -> "tshirt", "shoes" -> "shoe")."""
    word = word.replace("-", "")
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    return word


def _contains(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    return 0 < n <= len(haystack) and any(
        list(haystack[i : i + n]) == list(needle) for i in range(len(haystack) - n + 1)
    )


def _is_number(word: str) -> bool:
    return word.replace(".", "").isdigit()


def _is_phrase_edge(word: str) -> bool:
    """Noun phrases neither start nor end with a stopword or a number ("with printed detail", "3 briefs")."""
    return word not in STOPWORDS and not _is_number(word)


def _record(item: Any) -> tuple[str, dict[str, str]]:
    """(title, attribute values) from a vitrine.catalog Product or a products.jsonl-style mapping."""
    if isinstance(item, Mapping):
        title = item.get("title")
        attrs = {f: item.get(f) for f in ATTRIBUTE_FIELDS}
    elif hasattr(item, "title") and hasattr(item, "attribute"):
        title = item.title
        attrs = {f: item.attribute(f) for f in ATTRIBUTE_FIELDS}
    else:
        raise TypeError(f"expected a Product or a mapping with 'title', got {type(item).__name__}")
    if not isinstance(title, str) or not title.strip():
        raise ValueError(f"every product needs a non-empty title, got {title!r}")
    return title, {f: v.strip().lower() for f, v in attrs.items() if isinstance(v, str) and v.strip()}


@dataclass
class ConceptGraph:
    concepts: list[str]
    kinds: list[list[str]]  # per concept: "phrase" and/or "attribute:<field>"
    parents: list[list[int]]  # direct is-a edges, child -> hypernyms
    text_concepts: list[list[int]] = field(default_factory=list)  # per build item, incl. hypernyms
    brand_words: frozenset[str] = frozenset()
    min_count: int = 5
    max_ngram: int = 3

    def __post_init__(self) -> None:
        if not (len(self.concepts) == len(self.kinds) == len(self.parents)):
            raise ValueError("concepts, kinds and parents must have the same length")
        self._index = {c: i for i, c in enumerate(self.concepts)}
        if len(self._index) != len(self.concepts):
            raise ValueError("duplicate concept phrases")
        self._closure = [self._ancestors(i) for i in range(len(self.concepts))]
        self._attribute_ids = [i for i, k in enumerate(self.kinds) if any(x.startswith(ATTRIBUTE) for x in k)]
        self._norm_words = [[_norm(w) for w in words(c)] for c in self.concepts]

    # -- building ---------------------------------------------------------------------------------
    @classmethod
    def build(cls, products: Iterable[Any], min_count: int = 5, max_ngram: int = 3) -> "ConceptGraph":
        """Mine concepts from training products (Product objects or products.jsonl rows)."""
        if min_count < 1 or max_ngram < 1:
            raise ValueError("min_count and max_ngram must be >= 1")
        records = [_record(p) for p in products]
        if not records:
            raise ValueError("no products to build a concept graph from")
        attr_kinds: dict[str, set[str]] = {}
        for _, attrs in records:
            for f, value in attrs.items():
                attr_kinds.setdefault(value, set()).add(f"{ATTRIBUTE}:{f}")
        attribute_words = {w for value in attr_kinds for w in words(value)}
        brand_words = _brand_words(records, attribute_words)

        suffix_counts: Counter[tuple[str, ...]] = Counter()
        for title, _ in records:
            body = _body(words(title), brand_words)
            suffix_counts.update(_suffixes(body, max_ngram))
        junk = STOPWORDS | brand_words
        phrases = {
            " ".join(ngram)
            for ngram, count in suffix_counts.items()
            if count >= min_count
            and _is_phrase_edge(ngram[0])
            and _is_phrase_edge(ngram[-1])
            and not any(ch.isdigit() for ch in ngram[-1])  # sizes and codes ("us14") are no head nouns
            and not all(w in junk or _is_number(w) for w in ngram)
        }

        concepts = sorted(set(attr_kinds) | phrases)
        kinds = [sorted(attr_kinds.get(c, set()) | ({PHRASE} if c in phrases else set())) for c in concepts]
        index = {c: i for i, c in enumerate(concepts)}
        normed = [[_norm(w) for w in words(c)] for c in concepts]
        attribute_ids = [index[v] for v in sorted(attr_kinds)]
        parents: list[list[int]] = []
        for i, concept in enumerate(concepts):
            edges: set[int] = set()
            tokens = words(concept)
            if concept in phrases:
                for n in range(len(tokens) - 1, 0, -1):  # longest shorter suffix that is a concept
                    shorter = " ".join(tokens[-n:])
                    if shorter in phrases:
                        edges.add(index[shorter])
                        break
            for a in attribute_ids:
                if a != i and len(normed[a]) < len(normed[i]) and _contains(normed[i], normed[a]):
                    edges.add(a)
            parents.append(sorted(edges))

        graph = cls(concepts, kinds, parents, brand_words=frozenset(brand_words), min_count=min_count, max_ngram=max_ngram)
        graph.text_concepts = [graph._concepts_of_record(title, attrs) for title, attrs in records]
        return graph

    # -- queries ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.concepts)

    def index(self, phrase: str) -> int:
        """Concept id of a phrase (KeyError if it is not a concept)."""
        return self._index[phrase.strip().lower()]

    def hypernyms(self, concept: int | str) -> list[int]:
        """All ancestors of a concept (transitive is-a), sorted ids."""
        cid = self.index(concept) if isinstance(concept, str) else int(concept)
        if not 0 <= cid < len(self.concepts):
            raise IndexError(f"concept id {cid} out of range (0..{len(self.concepts) - 1})")
        return sorted(self._closure[cid])

    def concepts_of(self, text_or_index: str | int) -> list[int]:
        """Concept ids of a build item (by index) or of a free title, hypernyms included."""
        if isinstance(text_or_index, str):
            return self._concepts_of_record(text_or_index, {})
        i = int(text_or_index)
        if not 0 <= i < len(self.text_concepts):
            raise IndexError(f"text index {i} out of range (0..{len(self.text_concepts) - 1})")
        return list(self.text_concepts[i])

    def phrases(self, ids: Iterable[int]) -> list[str]:
        return [self.concepts[i] for i in ids]

    def stats(self) -> dict[str, Any]:
        per_text = [len(c) for c in self.text_concepts]
        return {
            "concepts": len(self.concepts),
            "phrase_concepts": sum(PHRASE in k for k in self.kinds),
            "attribute_concepts": len(self._attribute_ids),
            "is_a_edges": sum(len(p) for p in self.parents),
            "texts": len(self.text_concepts),
            "texts_without_concepts": sum(n == 0 for n in per_text),
            "mean_concepts_per_text": (sum(per_text) / len(per_text)) if per_text else 0.0,
            "min_count": self.min_count,
            "max_ngram": self.max_ngram,
        }

    # -- persistence ------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(
            {
                "format": "vitrine-concept-graph/1",
                "min_count": self.min_count,
                "max_ngram": self.max_ngram,
                "concepts": self.concepts,
                "kinds": self.kinds,
                "parents": self.parents,
                "brand_words": sorted(self.brand_words),
                "text_concepts": self.text_concepts,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "ConceptGraph":
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != "vitrine-concept-graph/1":
            raise ValueError("not a Vitrine concept graph (format vitrine-concept-graph/1)")
        graph = cls(
            data["concepts"],
            data["kinds"],
            data["parents"],
            text_concepts=data.get("text_concepts", []),
            brand_words=frozenset(data.get("brand_words", [])),
            min_count=data["min_count"],
            max_ngram=data["max_ngram"],
        )
        n = len(graph.concepts)
        if any(not 0 <= p < n for ps in graph.parents for p in ps) or any(
            not 0 <= c < n for cs in graph.text_concepts for c in cs
        ):
            raise ValueError("concept graph JSON refers to concept ids out of range")
        return graph

    # -- internals --------------------------------------------------------------------------------
    def _ancestors(self, cid: int) -> set[int]:
        seen: set[int] = set()
        stack = list(self.parents[cid])
        while stack:
            p = stack.pop()
            if p not in seen and p != cid:
                seen.add(p)
                stack.extend(self.parents[p])
        return seen

    def _concepts_of_record(self, title: str, attrs: Mapping[str, str]) -> list[int]:
        tokens = words(title)
        found: set[int] = set()
        for ngram in _suffixes(_body(tokens, self.brand_words), self.max_ngram):
            cid = self._index.get(" ".join(ngram))
            if cid is not None and PHRASE in self.kinds[cid]:
                found.add(cid)
        for value in attrs.values():
            if value in self._index:
                found.add(self._index[value])
        normed = [_norm(w) for w in tokens]
        present = set(normed)
        for a in self._attribute_ids:  # attribute values the title spells out ("blue", "casual shoes")
            value = self._norm_words[a]
            if value and value[0] in present and _contains(normed, value):
                found.add(a)
        for cid in list(found):
            found |= self._closure[cid]
        return sorted(found)


def _brand_words(records: Sequence[tuple[str, dict[str, str]]], attribute_words: set[str]) -> set[str]:
    """Words of the brand prefix: everything before the gender word, or the first word if none."""
    brands: set[str] = set()
    for title, _ in records:
        tokens = words(title)
        prefix = _brand_prefix(tokens)
        brands.update(w for w in tokens[:prefix] if w not in attribute_words and w not in STOPWORDS)
    return brands


def _brand_prefix(tokens: Sequence[str]) -> int:
    """Length of the brand prefix of a title's tokens."""
    for i, w in enumerate(tokens[:5]):
        if w in GENDER_WORDS:
            return i
    return 1 if len(tokens) > 1 else 0


def _body(tokens: Sequence[str], brand_words: frozenset[str] | set[str]) -> list[str]:
    """Title tokens after a leading brand and gender ("Reid & Taylor Men Black Socks" -> black socks).

    Only known brand words are stripped, so free-text queries ("red running shoes") stay whole;
    the last token (the head noun) is always kept.
    """
    start = 0
    while start < len(tokens) - 1 and (tokens[start] in brand_words or tokens[start] in STOPWORDS):
        start += 1
    while start < len(tokens) - 1 and tokens[start] in GENDER_WORDS:
        start += 1
    return list(tokens[start:])


def _suffixes(tokens: Sequence[str], max_ngram: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[-n:]) for n in range(1, min(max_ngram, len(tokens)) + 1)]


def visual_concepts(graph: ConceptGraph) -> list[list[int]]:
    """Per build item (training text), its concept ids a photo can show, hypernyms included."""
    visual = {i for i, kinds in enumerate(graph.kinds) if any(k in VISUAL_CONCEPT_KINDS for k in kinds)}
    return [[c for c in graph.concepts_of(i) if c in visual] for i in range(len(graph.text_concepts))]
