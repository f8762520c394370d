"""What every `SearchIndex` backend does around its engine, written once so that the Faiss and the
Qdrant backends agree to the bit: checking the query and the arguments, how many candidates each
modality fetches, and the exact ranking of the union of candidates (float64 inner products row by
row, fused with α, sorted by score then id). Pure functions over numpy arrays.
"""
from __future__ import annotations

import numpy as np

from vitrine.scoring import Hit, fuse

MIN_FETCH_K = 100
FETCH_K_PER_RESULT = 10


def default_fetch_k(k: int) -> int:
    return max(MIN_FETCH_K, FETCH_K_PER_RESULT * k)


def check_query(query_emb: np.ndarray, embed_dim: int) -> np.ndarray:
    """The query as a contiguous float32 (D,) vector; ValueError for a wrong shape or non-finite values."""
    query = np.asarray(query_emb, dtype=np.float32)
    if query.ndim == 2 and query.shape[0] == 1:
        query = query[0]
    if query.shape != (embed_dim,):
        raise ValueError(f"query embedding has shape {query.shape}; this index holds {embed_dim}-d vectors")
    if not np.isfinite(query).all():
        raise ValueError("query embedding has non-finite values")
    return np.ascontiguousarray(query)


def check_counts(k: object, fetch_k: object) -> None:
    """k and fetch_k (None: the default) must be positive integers (not booleans)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if fetch_k is not None and (isinstance(fetch_k, bool) or not isinstance(fetch_k, (int, np.integer)) or fetch_k < 1):
        raise ValueError(f"fetch_k must be a positive integer, got {fetch_k!r}")


def fetch_size(n: int, k: int, fetch_k: int | None) -> int:
    """Candidates to fetch per modality out of `n` products: fetch_k, or the default for k, and at least k."""
    return min(n, max(int(k), int(fetch_k) if fetch_k is not None else default_fetch_k(int(k))))


def exact_similarities(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Float64 inner products of each row with the query, row by row (identical vectors, identical scores)."""
    return (np.asarray(vectors, dtype=np.float64) * query.astype(np.float64)).sum(axis=1)


def rank_union(ids: np.ndarray, title: np.ndarray, image: np.ndarray, alpha: float, k: int) -> list[Hit]:
    """The top k of the candidates `ids` by α·title + (1−α)·image, ties broken by id."""
    score = fuse(title, image, alpha)
    order = np.lexsort((ids, -score))[:k]
    return [Hit(str(ids[i]), float(score[i]), float(title[i]), float(image[i])) for i in order]
