"""Rank/recall arithmetic on hand-built score matrices with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vitrine.evaluation.ranking import (
    capped_recall_at_k,
    ndcg_at_k,
    precision_at_k,
    rank_against_negatives,
    rank_of_best_relevant,
    rank_of_positive,
    ranked_relevance,
    recall_at_k,
    recall_curve,
)


def test_rank_against_negatives_counts_ties_against_the_model():
    positive = np.array([0.5, 0.9, 0.1])
    negatives = np.array([[0.5, 0.2, 0.7], [0.1, 0.2, 0.3], [0.1, 0.1, -np.inf]])
    # query 0: 0.5 (tie) and 0.7 beat it; query 1: none; query 2: two ties, padding never counts
    assert rank_against_negatives(positive, negatives).tolist() == [2, 0, 2]


def test_rank_of_positive_excludes_itself_and_counts_ties():
    scores = np.array([[0.1, 0.9, 0.9, 0.3], [0.4, 0.4, 0.4, 0.4], [1.0, 0.2, 0.3, 0.4]])
    assert rank_of_positive(scores, np.array([1, 0, 0])).tolist() == [1, 3, 0]
    assert rank_of_positive(scores, np.array([0, 3, 2])).tolist() == [3, 3, 2]


def test_rank_of_best_relevant_uses_the_best_relevant_and_ignores_other_relevant():
    scores = np.array([[0.9, 0.8, 0.8, 0.1], [0.2, 0.5, 0.9, 0.9]])
    relevant = np.array([[False, True, False, True], [False, False, True, True]])
    # row 0: best relevant 0.8; non-relevant >= 0.8: cand 0 (0.9) and cand 2 (tie) -> 2
    # row 1: both relevant share the top score; the relevant tie does not count -> 0
    assert rank_of_best_relevant(scores, relevant).tolist() == [2, 0]


def test_rank_of_best_relevant_requires_a_relevant_candidate():
    with pytest.raises(AssertionError):
        rank_of_best_relevant(np.zeros((1, 3)), np.zeros((1, 3), dtype=bool))


def test_constant_scores_rank_last():
    scores = np.full((4, 50), 0.3)
    ranks = rank_of_positive(scores, np.arange(4))
    assert ranks.tolist() == [49] * 4
    assert recall_at_k(ranks, 10) == 0.0


def test_recall_at_k_and_curve():
    ranks = np.array([0, 0, 1, 4, 9, 10, 30, 2])
    assert recall_at_k(ranks, 1) == 2 / 8
    assert recall_at_k(ranks, 5) == 5 / 8
    assert recall_at_k(ranks, 10) == 6 / 8
    curve = recall_curve(ranks, max_k=12)
    assert len(curve) == 12 and curve[0] == 2 / 8 and curve[9] == 6 / 8 and curve[10] == 7 / 8
    assert all(a <= b for a, b in zip(curve, curve[1:]))
    with pytest.raises(ValueError):
        recall_at_k(np.array([], dtype=int), 1)


def test_ranked_relevance_orders_by_score_with_ties_against():
    scores = np.array([[1.0, 1.0, 0.5, 0.7], [0.1, 0.9, 0.9, 0.2]])
    relevant = np.array([[True, False, False, True], [False, True, False, False]])
    hits = ranked_relevance(scores, relevant, k=3)
    # row 0: tie at 1.0 puts the non-relevant first, then relevant 1.0, then relevant 0.7
    assert hits.tolist() == [[False, True, True], [False, True, False]]


def test_precision_at_k():
    hits = np.array([[True, False, True, True], [False, False, False, False]])
    assert precision_at_k(hits, 1).tolist() == [1.0, 0.0]
    assert precision_at_k(hits, 4).tolist() == [0.75, 0.0]


def test_ndcg_binary_gains_against_hand_computed_values():
    hits = np.array([[True, False, True], [True, False, True], [False, False, False], [True, True, True]])
    n_relevant = np.array([2, 5, 3, 3])
    got = ndcg_at_k(hits, n_relevant, k=3)
    dcg = 1 + 1 / math.log2(4)
    assert got[0] == pytest.approx(dcg / (1 + 1 / math.log2(3)))
    assert got[1] == pytest.approx(dcg / (1 + 1 / math.log2(3) + 1 / math.log2(4)))
    assert got[2] == 0.0
    assert got[3] == pytest.approx(1.0)


def test_ndcg_with_fewer_ranked_items_than_k():
    hits = np.array([[False, True]])
    assert ndcg_at_k(hits, np.array([1]), k=10)[0] == pytest.approx(1 / math.log2(3))


def test_capped_recall_divides_by_min_of_k_and_relevant():
    hits = np.zeros((3, 10), dtype=bool)
    hits[:, [0, 4, 9]] = True
    got = capped_recall_at_k(hits, np.array([100, 4, 3]), k=10)
    assert got.tolist() == [0.3, 0.75, 1.0]


# ---------------------------------------------------------------- library oracles (untied scores)
# The hand-written metrics count ties against the model on purpose; on untied scores they must
# agree with scikit-learn's.


def untied(seed: int, shape: tuple[int, int]) -> np.ndarray:
    scores = np.random.default_rng(seed).permutation(shape[0] * shape[1]).reshape(shape).astype(np.float64)
    return scores / scores.size


def test_recall_matches_sklearn_top_k_accuracy_on_untied_scores():
    from sklearn.metrics import top_k_accuracy_score

    scores = untied(0, (200, 30))
    positive = np.random.default_rng(1).integers(0, 30, size=200)
    ranks = rank_of_positive(scores, positive)
    for k in (1, 5, 10):
        assert recall_at_k(ranks, k) == pytest.approx(top_k_accuracy_score(positive, scores, k=k, labels=np.arange(30)))


def test_ndcg_matches_sklearn_ndcg_score_on_untied_scores():
    from sklearn.metrics import ndcg_score

    scores = untied(2, (50, 40))
    relevant = np.random.default_rng(3).random((50, 40)) < 0.2
    relevant[:, 0] = True  # every query has a relevant item
    ours = ndcg_at_k(ranked_relevance(scores, relevant, 10), relevant.sum(axis=1), 10)
    theirs = [ndcg_score(relevant[i : i + 1].astype(float), scores[i : i + 1], k=10) for i in range(50)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)


def test_binary_auc_matches_sklearn_roc_auc_with_and_without_ties():
    from sklearn.metrics import roc_auc_score

    from vitrine.evaluation.rerank import binary_auc

    rng = np.random.default_rng(4)
    for positive, negative in [(rng.normal(1, 1, 300), rng.normal(0, 1, 500)),
                               (rng.integers(0, 4, 300).astype(float), rng.integers(0, 3, 200).astype(float))]:
        labels = np.r_[np.ones(positive.size), np.zeros(negative.size)]
        assert binary_auc(positive, negative) == pytest.approx(roc_auc_score(labels, np.r_[positive, negative]))
