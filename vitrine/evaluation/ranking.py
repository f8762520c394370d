"""Rank and recall arithmetic on similarity scores.

Ranks are 0-based: rank 0 means the relevant item beat every other candidate.
Ties always count against the model (a candidate scoring exactly as high as the
relevant one is ranked above it), so a constant encoder scores no better than
chance and never better than an honest one.
"""

from __future__ import annotations

import numpy as np


def rank_against_negatives(positive_scores: np.ndarray, negative_scores: np.ndarray) -> np.ndarray:
    """Per query, the number of negatives scoring >= the positive.

    positive_scores: (q,); negative_scores: (q, k). Padding slots should hold -inf.
    """
    assert positive_scores.ndim == 1 and negative_scores.ndim == 2, (
        positive_scores.shape,
        negative_scores.shape,
    )
    assert negative_scores.shape[0] == positive_scores.shape[0], (
        positive_scores.shape,
        negative_scores.shape,
    )
    return (negative_scores >= positive_scores[:, None]).sum(axis=1)


def rank_of_positive(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Per row of scores (q, c), how many other candidates score >= the candidate `positive[i]`."""
    assert scores.ndim == 2 and positive.shape == (scores.shape[0],), (scores.shape, positive.shape)
    rows = np.arange(scores.shape[0])
    positive_scores = scores[rows, positive]
    # The positive itself always satisfies >=; subtract it.
    return (scores >= positive_scores[:, None]).sum(axis=1) - 1


def rank_of_best_relevant(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Per row of scores (q, c), how many non-relevant candidates score >= the best relevant one.

    relevant: boolean (q, c), at least one True per row.
    """
    assert scores.shape == relevant.shape and relevant.dtype == bool, (
        scores.shape,
        relevant.shape,
        relevant.dtype,
    )
    assert relevant.any(axis=1).all(), "every query needs at least one relevant candidate"
    best = np.where(relevant, scores, -np.inf).max(axis=1)
    return ((scores >= best[:, None]) & ~relevant).sum(axis=1)


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Fraction of queries whose relevant item is within the top k (rank < k)."""
    if ranks.size == 0:
        raise ValueError("no queries")
    return float((ranks < k).mean())


def recall_curve(ranks: np.ndarray, max_k: int = 20) -> list[float]:
    """[R@1, R@2, ..., R@max_k]."""
    return [recall_at_k(ranks, k) for k in range(1, max_k + 1)]


def ranked_relevance(scores: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    """Boolean (q, min(k, c)): is the item at each of the top k positions relevant?

    Items are ordered by descending score; among equal scores the non-relevant come first
    (ties count against the model, as in the recall protocols).
    """
    assert scores.shape == relevant.shape and relevant.dtype == bool, (
        scores.shape,
        relevant.shape,
        relevant.dtype,
    )
    # lexsort: last key is primary. Descending score, then non-relevant (False) first.
    order = np.lexsort((relevant, -scores), axis=-1)[:, :k]
    return np.take_along_axis(relevant, order, axis=1)


def precision_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    """Per query, relevant items in the top k divided by k. hits: (q, >=k') from ranked_relevance."""
    return hits[:, :k].sum(axis=1) / k


def ndcg_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per query, nDCG@k with binary gains; the ideal ranking puts min(k, n_relevant) relevant items first."""
    assert hits.shape[0] == n_relevant.shape[0], (hits.shape, n_relevant.shape)
    assert (n_relevant >= 1).all(), "every query needs at least one relevant item"
    top = hits[:, :k].astype(np.float64)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (top * discounts[: top.shape[1]]).sum(axis=1)
    ideal_len = np.minimum(n_relevant, k)
    idcg = np.cumsum(discounts)[ideal_len - 1]
    return dcg / idcg


def capped_recall_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per query, relevant items in the top k divided by min(k, n_relevant).

    Standard recall divides by n_relevant, which is meaningless for a query with hundreds of
    relevant products (it can never exceed k / n_relevant); capping the denominator at k makes
    1.0 mean "the top k are as relevant as they could be".
    """
    assert hits.shape[0] == n_relevant.shape[0], (hits.shape, n_relevant.shape)
    assert (n_relevant >= 1).all(), "every query needs at least one relevant item"
    return hits[:, :k].sum(axis=1) / np.minimum(n_relevant, k)
