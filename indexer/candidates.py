"""What every `SearchIndex` backend does around its engine, written once so that the Faiss and the
Qdrant backends agree to the bit: checking the query and the arguments, how many candidates each
modality fetches, and the exact scores of candidates (float32 inner products, every row reduced by the
same kernel, fused in float64 with α, sorted by score then id). Pure functions over numpy arrays.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from indexer.store import SqliteProductStore
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


# An approximate index needs about fetch / selectivity results to keep `fetch` matches of a filter.
# Past this many per index, scoring the filtered set exactly is cheaper: HNSW's efSearch and IVF's
# scanned lists grow with the request (docs/RESULTS.md, "Filters on approximate indexes").
OVERFETCH_MAX = 1000


def filtered_plan(n: int, allowed: int, fetch: int, *, exact_index: bool, brute_force_max_rows: int,
                  overfetch_max: int = OVERFETCH_MAX) -> tuple[str, int]:  # fmt: skip
    """How to search `allowed` of `n` products for `fetch` candidates: ("exact", 0) scores the filtered
    set; ("selector", 0) asks an exact index for the allowed labels only; ("overfetch", f) asks an
    approximate index for f results per round (the expected need, doubling while too few match)."""
    assert 0 < allowed <= n and fetch >= 1, (n, allowed, fetch)
    if allowed <= max(brute_force_max_rows, fetch):
        return "exact", 0
    if exact_index:
        return "selector", 0
    expected = -(-fetch * n // allowed)  # ceil(fetch / selectivity)
    if expected > overfetch_max:
        return "exact", 0
    return "overfetch", min(n, max(fetch, expected))


def exact_similarities(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    """float32 (n,) inner products of the rows of a gathered (n, D) block with `query`.

    einsum reduces every row with the same kernel (a BLAS gemv may not), so equal rows get equal
    scores and ties fall to the id, in every backend."""
    return np.einsum("ij,j->i", np.asarray(vectors, dtype=np.float32), np.asarray(query, dtype=np.float32))


def scored_hits(ids: np.ndarray, title: np.ndarray, image: np.ndarray, alpha: float) -> list[Hit]:
    """Hits of `ids` in the given order, scored α·title + (1−α)·image (fused in float64)."""
    score = fuse(title.astype(np.float64), image.astype(np.float64), alpha)
    return [Hit(str(i), float(s), float(t), float(m)) for i, s, t, m in zip(ids, score, title, image)]


def rank_union(ids: np.ndarray, title: np.ndarray, image: np.ndarray, alpha: float, k: int) -> list[Hit]:
    """The top k of the candidates `ids` by α·title + (1−α)·image (fused in float64), ties broken by id."""
    score = fuse(title.astype(np.float64), image.astype(np.float64), alpha)
    order = np.lexsort((ids, -score))[:k]
    return [Hit(str(ids[i]), float(score[i]), float(title[i]), float(image[i])) for i in order]


def rows_of_ids(store: SqliteProductStore, labels: np.ndarray, ids: Sequence[str]) -> np.ndarray:
    """Rows (positions in the sorted `labels`) of `ids`, in their order; KeyError for the first unknown id."""
    found = store.labels_of(list(ids))
    unknown = [i for i in ids if i not in found]
    if unknown:
        raise KeyError(unknown[0])
    return np.searchsorted(labels, np.array([found[i] for i in ids], dtype=np.int64))
