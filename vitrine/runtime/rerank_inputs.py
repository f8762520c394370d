"""Cross-encoder rows: `[CLS] query [SEP] title [SEP]` token ids, then the image's patch tokens.

Shared by training (trainer/cross_encoder) and serving (vitrine/runtime/reranker.py), so both build
the same ids. Segments follow FashionBERT: 0 = query (with [CLS] and its [SEP]), 1 = title (with its
[SEP]), 2 = image patches (added inside the model). Words are whitespace words: the unit of
whole-word masking and of attribute matching.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from vitrine.errors import UserError

QUERY_SEGMENT, TITLE_SEGMENT, IMAGE_SEGMENT = 0, 1, 2
NUM_SEGMENTS = 3
# Aligned inputs (issue 12): each row also carries the dual encoder's embeddings, in its shared space:
# the query's (a text's, or a photo's for image queries), the candidate's title's (zeros when the row
# has no title) and the candidate's image's. The cross-encoder starts from what the first stage knows.
ALIGNED_SLOTS = ("query", "title", "image")


def aligned_rows(query: np.ndarray, titles: np.ndarray | None, images: np.ndarray) -> np.ndarray:
    """float32 [K, 3, D] aligned inputs of K rows: one query embedding [D] (or one per row [K, D]),
    the candidates' title embeddings [K, D] (None: rows without titles) and image embeddings [K, D]."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 2:
        raise UserError(f"image embeddings must be [K, D], got {images.shape}")
    k, d = images.shape
    query = np.asarray(query, dtype=np.float32)
    if query.shape == (d,):
        query = np.broadcast_to(query, (k, d))
    if query.shape != (k, d):
        raise UserError(f"query embedding must be [{d}] or [{k}, {d}], got {query.shape}")
    out = np.zeros((k, len(ALIGNED_SLOTS), d), np.float32)
    out[:, 0], out[:, 2] = query, images
    if titles is not None:
        titles = np.asarray(titles, dtype=np.float32)
        if titles.shape != (k, d):
            raise UserError(f"title embeddings must be [{k}, {d}], got {titles.shape}")
        out[:, 1] = titles
    return out


@dataclass(frozen=True)
class PairRow:
    """One unpadded text row. `word_ids`: query words 0..nq-1, title words nq.., specials -1."""

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    word_ids: np.ndarray
    query_words: int


class PairEncoder:
    """Builds the text half of cross-encoder rows with the `tokenizers` library (no torch)."""

    def __init__(self, tokenizer: Tokenizer, *, max_query_tokens: int, max_title_tokens: int) -> None:
        if max_query_tokens < 1 or max_title_tokens < 0:
            raise ValueError("max_query_tokens must be >= 1 and max_title_tokens >= 0")
        tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a private copy: we change its settings
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer = tokenizer
        self.max_query_tokens = int(max_query_tokens)
        self.max_title_tokens = int(max_title_tokens)
        ids = {name: tokenizer.token_to_id(name) for name in ("[CLS]", "[SEP]", "[PAD]", "[MASK]")}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise UserError(f"the reranker tokenizer lacks {', '.join(missing)}")
        self.cls_id, self.sep_id, self.pad_id, self.mask_id = (int(ids[n]) for n in ("[CLS]", "[SEP]", "[PAD]", "[MASK]"))
        self.vocab_size = int(tokenizer.get_vocab_size())

    @classmethod
    def from_file(cls, path: str | Path, **limits: int) -> PairEncoder:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"reranker tokenizer missing: {path}")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception on malformed files
            raise UserError(f"cannot read reranker tokenizer {path}: {exc}") from exc
        return cls(tokenizer, **limits)

    def save(self, path: str | Path) -> None:
        self._tokenizer.save(str(path))

    def with_caps(self, max_query_tokens: int, max_title_tokens: int) -> PairEncoder:
        """The same tokenizer with other text caps."""
        return PairEncoder(self._tokenizer, max_query_tokens=max_query_tokens, max_title_tokens=max_title_tokens)

    @property
    def max_text_tokens(self) -> int:
        """Longest possible text row: [CLS] query [SEP] title [SEP]."""
        return self.max_query_tokens + self.max_title_tokens + 3

    def word_pieces(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of `text` and the whitespace-word index of each."""
        words = text.split()
        if not words:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        enc = self._tokenizer.encode(words, is_pretokenized=True, add_special_tokens=False)
        return np.asarray(enc.ids, np.int64), np.asarray(enc.word_ids, np.int64)

    def row(self, query: str, title: str = "") -> PairRow:
        if not isinstance(query, str) or not isinstance(title, str):
            raise UserError("query and title must be strings")
        q_ids, q_words = self.word_pieces(query)
        t_ids, t_words = self.word_pieces(title)
        q_ids, q_words = q_ids[: self.max_query_tokens], q_words[: self.max_query_tokens]
        t_ids, t_words = t_ids[: self.max_title_tokens], t_words[: self.max_title_tokens]
        nq = len(query.split())
        cls_, sep = np.array([self.cls_id]), np.array([self.sep_id])
        ids = np.concatenate([cls_, q_ids, sep, t_ids, sep])
        types = np.concatenate([np.zeros(len(q_ids) + 2, np.int64), np.ones(len(t_ids) + 1, np.int64)])
        none = np.array([-1])
        words = np.concatenate([none, q_words, none, t_words + nq, none])
        return PairRow(ids.astype(np.int64), types, words.astype(np.int64), nq)

    def pad(self, rows: Sequence[PairRow], pad_to: int | None = None) -> dict[str, np.ndarray]:
        """Stack rows, padded to the longest row (variable sequence length) or to `pad_to`."""
        if not rows:
            raise UserError("no rows to pad")
        longest = max(len(r.input_ids) for r in rows)
        width = longest if pad_to is None else int(pad_to)
        if width < longest:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({longest})")
        ids = np.full((len(rows), width), self.pad_id, np.int64)
        types = np.zeros((len(rows), width), np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            n = len(r.input_ids)
            ids[i, :n], types[i, :n], mask[i, :n] = r.input_ids, r.token_type_ids, 1
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}

    def batch(self, queries: Sequence[str], titles: Sequence[str], pad_to: int | None = None) -> dict[str, np.ndarray]:
        if len(queries) != len(titles):
            raise ValueError(f"{len(queries)} queries but {len(titles)} titles")
        return self.pad([self.row(q, t) for q, t in zip(queries, titles)], pad_to)


__all__ = ["ALIGNED_SLOTS", "IMAGE_SEGMENT", "NUM_SEGMENTS", "QUERY_SEGMENT", "TITLE_SEGMENT", "PairEncoder", "PairRow", "aligned_rows"]
