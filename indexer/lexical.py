"""The lexical index of an index version: BM25 (bm25s) over each product's title and attribute values.

Shoppers type words no photo shows -- brands ("lee cooper", "u.s. polo assn."), exact model names --
and a vector model trained on a few thousand titles blurs them. BM25 matches them exactly.

Each version folder holds its own lexical index (`lexical/`: bm25s's sparse score matrix and
vocabulary, plus `ids.json`, the product of every document row). Documents are in label order, the
row order of the vector files, so a row mask from `FilterColumns` filters lexical results as it
filters vector ones. A build writes it; an upsert or delete rebuilds it from the new version's
product store inside the staging folder (bm25s has no incremental update; 21,100 products take about
10 s on a busy 2-core machine), so it is published by the same atomic CURRENT switch as the vectors and never disagrees
with them. A version written before lexical indexes existed gets one built in memory on first use.

Tokens (`tokenize`): Unicode-folded and lower-cased; "U.S." and "Levi's" join to "us" and
"levis"; a hyphenated word is kept whole and in parts ("t-shirt" -> "tshirt", "t", "shirt"), so
"tshirt" and "t shirt" both match; "&" and other punctuation split; English Snowball stems
("shoes" -> "shoe", "jeans" -> "jean"); a few function words are dropped. Brand names are just
tokens: "Lee Cooper" is "lee" + "cooper", and BM25's idf weights a rare brand above "men".
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from vitrine.catalog.record import ProductRecord
from vitrine.errors import UserError

LEXICAL_DIR = "lexical"
IDS_FILE = "ids.json"
TOKENIZER = "vitrine-bm25-v1"  # bump when `tokenize` changes: older lexical folders are then rebuilt in memory
MAX_QUERY_TOKENS = 64  # a query's scoring cost grows with its distinct tokens
STOPWORDS = frozenset(["a", "an", "and", "for", "in", "of", "on", "the", "to", "with", "by", "at", "from"])
_JOINED = re.compile(r"(?<![0-9a-z])(?:[a-z]\.){2,}")  # u.s. -> us
_APOSTROPHE = re.compile(r"(?<=[0-9a-z])['\u2019](?=[0-9a-z])")  # levi's -> levis
_WORD = re.compile(r"[0-9a-z]+(?:-[0-9a-z]+)*")

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _stemmer() -> Any:
    import Stemmer  # PyStemmer: Snowball stemmers

    return Stemmer.Stemmer("english")


def fold(text: str) -> str:
    """Lower-case ASCII-folded text (accents dropped)."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()


def tokenize(text: str) -> list[str]:
    """The BM25 tokens of a title, attribute value or query (see the module docstring)."""
    text = fold(text)
    text = _JOINED.sub(lambda m: m.group(0).replace(".", "") + " ", text)
    text = _APOSTROPHE.sub("", text)
    words: list[str] = []
    for match in _WORD.finditer(text):
        word = match.group(0)
        if "-" in word:
            words.append(word.replace("-", ""))
            words.extend(part for part in word.split("-") if part)
        else:
            words.append(word)
    words = [w for w in words if w not in STOPWORDS]
    return _stemmer().stemWords(words) if words else []


def document_text(record: ProductRecord) -> str:
    """What a product's lexical document says: its title, category, subcategory and attribute values."""
    values = [record.title, record.category, record.subcategory, *(str(v) for _, v in sorted(record.attributes.items()))]
    return " ".join(v for v in values if v)


@dataclass(frozen=True)
class LexicalHit:
    id: str
    score: float  # BM25


class LexicalIndex:
    """BM25 over one version's products, rows in label order."""

    def __init__(self, retriever: Any, ids: Sequence[str]) -> None:
        self._retriever = retriever
        self.ids = np.asarray(list(ids), dtype=str) if len(ids) else np.zeros(0, dtype="<U1")

    @classmethod
    def build(cls, records: Iterable[ProductRecord]) -> LexicalIndex:
        import bm25s

        records = list(records)
        corpus = [tokenize(document_text(r)) for r in records]
        retriever = bm25s.BM25()
        if corpus:
            retriever.index(corpus, show_progress=False)
        return cls(retriever if corpus else None, [r.id for r in records])

    def save(self, folder: Path) -> dict[str, Any]:
        """Write into `folder/lexical/`; returns the manifest's `lexical` entry."""
        target = folder / LEXICAL_DIR
        target.mkdir()
        if self._retriever is not None:
            self._retriever.save(str(target))
        (target / IDS_FILE).write_text(json.dumps(self.ids.tolist(), ensure_ascii=False), encoding="utf-8")
        return {"dir": LEXICAL_DIR, "library": "bm25s", "tokenizer": TOKENIZER, "documents": int(self.ids.size)}

    @classmethod
    def load(cls, folder: Path) -> LexicalIndex:
        import bm25s

        target = folder / LEXICAL_DIR
        ids = json.loads((target / IDS_FILE).read_text(encoding="utf-8"))
        retriever = bm25s.BM25.load(str(target), mmap=True) if ids else None
        return cls(retriever, ids)

    def __len__(self) -> int:
        return int(self.ids.size)

    def scores(self, query: str) -> np.ndarray:
        """float32 (n,) BM25 score of every document for `query` (0 where no token matches)."""
        tokens = list(dict.fromkeys(tokenize(query)))[:MAX_QUERY_TOKENS]
        if self._retriever is None or not tokens:
            return np.zeros(len(self), dtype=np.float32)
        known = [t for t in tokens if t in self._retriever.vocab_dict]
        if not known:
            return np.zeros(len(self), dtype=np.float32)
        return np.asarray(self._retriever.get_scores(known), dtype=np.float32)

    def search(self, query: str, *, k: int, mask: np.ndarray | None = None) -> list[LexicalHit]:
        """Top-k documents with a positive score (within `mask`), by score then id."""
        scores = self.scores(query)
        if mask is not None:
            scores = np.where(mask, scores, 0.0)
        rows = np.flatnonzero(scores > 0)
        if rows.size > k:  # keep every row tied with the k-th, then sort exactly
            kth = np.partition(scores[rows], rows.size - k)[rows.size - k]
            rows = rows[scores[rows] >= kth]
        order = np.lexsort((self.ids[rows], -scores[rows]))[:k]
        return [LexicalHit(str(self.ids[rows[i]]), float(scores[rows[i]])) for i in order]


def write_lexical(folder: Path, records: Iterable[ProductRecord]) -> dict[str, Any]:
    """Build the lexical index of `records` (label order) into version folder `folder`; the manifest entry."""
    started = time.perf_counter()
    index = LexicalIndex.build(records)
    entry = index.save(folder)
    entry["seconds"] = round(time.perf_counter() - started, 3)
    return entry


class LexicalSearch:
    """The lexical side of an opened index version (mixed into `ProductIndex` and `QdrantIndex`).

    Needs `version_dir`, `manifest` (dict), `_store`, `_ids` (label order), `_columns` and
    `filter_mask(filters, include_predicted=...)` on the instance.
    The lexical index loads on first use; a version without one (written before they existed, or by
    another tokenizer) gets one built in memory from its product store.
    """

    version_dir: Path
    manifest: dict[str, Any]
    _ids: np.ndarray
    _columns: Any
    _store: Any
    _lexical_index: LexicalIndex | None = None
    filter_mask: Callable[..., np.ndarray]
    _lexical_lock = threading.Lock()

    @property
    def lexical(self) -> LexicalIndex:
        if self._lexical_index is None:
            with self._lexical_lock:
                if self._lexical_index is None:
                    self._lexical_index = self._open_lexical()
        return self._lexical_index

    def _open_lexical(self) -> LexicalIndex:
        entry = self.manifest.get("lexical") or {}
        index = None
        if entry.get("tokenizer") == TOKENIZER and (self.version_dir / LEXICAL_DIR / IDS_FILE).is_file():
            index = LexicalIndex.load(self.version_dir)
        if index is None or index.ids.tolist() != self._ids.tolist():
            if index is not None:
                raise UserError(f"index version {self.version_dir} is inconsistent: its lexical index and product store disagree")
            started = time.perf_counter()
            index = LexicalIndex.build(record for _, record in self._store.scan())
            log.info("index version %s has no lexical index: built one in memory (%d products, %.1f s)",
                     self.version_dir.name, len(index), time.perf_counter() - started)  # fmt: skip
        return index

    def lexical_search(self, query: str, *, k: int, filters: Mapping[str, str | list[str]] | None = None,
                       include_predicted: bool = False) -> list[LexicalHit]:  # fmt: skip
        """Top-k products by BM25 for `query`, with the same filters (and filter errors) as `search`."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        mask = self.filter_mask(filters, include_predicted=include_predicted) if filters else None
        return self.lexical.search(query, k=int(k), mask=mask)
