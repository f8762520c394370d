"""Fusing ranked lists from different retrievers (hybrid search: the vector ranking and BM25's).

Two standard ways, both pure functions over `{id: score}` lists (best first or not, it does not matter):

- Reciprocal rank fusion (Cormack et al., 2009): score(d) = Σ_i w_i / (k + rank_i(d)), ranks from 1,
  a list that misses d adds nothing. Needs no score calibration; `k` (60 in the paper) damps the head.
- Normalised weighted sum: each list's scores min-max scaled to [0, 1] over its own candidates,
  then Σ_i w_i · norm_i(d); a list that misses d adds 0 (d scored below its cut). Keeps score gaps
  that RRF throws away, but depends on each list's spread.

Results are sorted by fused score, ties by id, so a fusion is deterministic.
`search.service.engine` uses these for `mode: hybrid`; `bench/hybrid.py` picked the default on val.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

FusionMethod = Literal["rrf", "weighted"]
FUSION_METHODS: tuple[FusionMethod, ...] = ("rrf", "weighted")
RRF_K = 60
# How a text query is answered: embeddings only, BM25 only, or both fused.
SearchMode = Literal["vector", "lexical", "hybrid"]
SEARCH_MODES: tuple[SearchMode, ...] = ("vector", "lexical", "hybrid")
# Hybrid defaults, picked on val by bench/hybrid.py (best mean nDCG@10 over its shopper, brand, title and
# paraphrase queries; docs/RESULTS.md): the method and BM25's weight (the vector list gets 1 - it; rrf,
# when asked for, uses the same). Each list contributes its top `hybrid_depth(k)` candidates.
DEFAULT_FUSION: FusionMethod = "weighted"
DEFAULT_LEXICAL_WEIGHT = 0.7
MIN_HYBRID_DEPTH = 100


def hybrid_depth(k: int) -> int:
    """Candidates each retriever contributes to a fused top-k."""
    return max(MIN_HYBRID_DEPTH, 2 * int(k))


def _weights(lists: Sequence[Mapping[str, float]], weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * len(lists)
    if len(weights) != len(lists):
        raise ValueError(f"{len(lists)} lists but {len(weights)} weights")
    if any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative, got {list(weights)}")
    return [float(w) for w in weights]


def ranks(scores: Mapping[str, float]) -> dict[str, int]:
    """id -> rank from 1, by score descending, ties by id."""
    ordered = sorted(scores, key=lambda i: (-scores[i], i))
    return {ident: rank for rank, ident in enumerate(ordered, start=1)}


def min_max(scores: Mapping[str, float]) -> dict[str, float]:
    """Scores scaled to [0, 1] over this list; a list of equal scores scales to all 1."""
    if not scores:
        return {}
    low, high = min(scores.values()), max(scores.values())
    if high == low:
        return dict.fromkeys(scores, 1.0)
    return {ident: (score - low) / (high - low) for ident, score in scores.items()}


def rrf(lists: Sequence[Mapping[str, float]], *, weights: Sequence[float] | None = None, k: int = RRF_K) -> dict[str, float]:
    """Reciprocal rank fusion of `{id: score}` lists."""
    if k < 0:
        raise ValueError(f"rrf k must be >= 0, got {k}")
    fused: dict[str, float] = {}
    for scores, weight in zip(lists, _weights(lists, weights)):
        for ident, rank in ranks(scores).items():
            fused[ident] = fused.get(ident, 0.0) + weight / (k + rank)
    return fused


def weighted_sum(lists: Sequence[Mapping[str, float]], *, weights: Sequence[float] | None = None) -> dict[str, float]:
    """Σ w_i · min-max-normalised score_i; a list that misses an id adds 0."""
    fused: dict[str, float] = {}
    for scores, weight in zip(lists, _weights(lists, weights)):
        for ident, norm in min_max(scores).items():
            fused[ident] = fused.get(ident, 0.0) + weight * norm
    return fused


def fuse_lists(
    lists: Sequence[Mapping[str, float]], *, method: FusionMethod, weights: Sequence[float] | None = None, k: int | None = None
) -> list[tuple[str, float]]:
    """(id, fused score) best first (ties by id), cut to `k` when given."""
    if method == "rrf":
        fused = rrf(lists, weights=weights)
    elif method == "weighted":
        fused = weighted_sum(lists, weights=weights)
    else:
        raise ValueError(f"unknown fusion method {method!r}; expected one of {FUSION_METHODS}")
    ordered = sorted(fused.items(), key=lambda item: (-item[1], item[0]))
    return ordered if k is None else ordered[:k]
