"""Hybrid-search fusion (`vitrine.fusion`) on hand-built score lists."""
from __future__ import annotations

import pytest

from vitrine.fusion import fuse_lists, hybrid_depth, min_max, ranks, rrf, weighted_sum

VECTOR = {"a": 0.9, "b": 0.5, "c": 0.1}
BM25 = {"c": 5.0, "a": 3.0, "d": 1.0}


def test_ranks_are_by_score_then_id():
    assert ranks({"x": 1.0, "b": 2.0, "a": 1.0}) == {"b": 1, "a": 2, "x": 3}


def test_rrf_sums_reciprocal_ranks_and_a_missing_list_adds_nothing():
    fused = rrf([VECTOR, BM25], k=60)
    assert fused == pytest.approx({"a": 1 / 61 + 1 / 62, "b": 1 / 62, "c": 1 / 63 + 1 / 61, "d": 1 / 63})
    assert [i for i, _ in fuse_lists([VECTOR, BM25], method="rrf")] == ["a", "c", "b", "d"]


def test_rrf_weights_scale_each_list():
    fused = rrf([VECTOR, BM25], weights=[0.25, 0.75], k=0)
    assert fused == pytest.approx({"a": 0.25 + 0.75 / 2, "b": 0.25 / 2, "c": 0.25 / 3 + 0.75, "d": 0.75 / 3})
    only_first = fuse_lists([VECTOR, BM25], method="rrf", weights=[1.0, 0.0])
    assert [i for i, _ in only_first][:3] == ["a", "b", "c"]


def test_min_max_scales_each_list_to_unit_range():
    assert min_max({"a": 2.0, "b": 4.0, "c": 3.0}) == {"a": 0.0, "b": 1.0, "c": 0.5}
    assert min_max({"a": 7.0, "b": 7.0}) == {"a": 1.0, "b": 1.0}  # no spread: all count fully
    assert min_max({}) == {}


def test_weighted_sum_of_normalised_scores_with_ties_by_id():
    fused = weighted_sum([VECTOR, BM25], weights=[0.5, 0.5])
    # vector norms a 1, b 0.5, c 0; BM25 norms c 1, a 0.5, d 0
    assert fused == pytest.approx({"a": 0.75, "b": 0.25, "c": 0.5, "d": 0.0})
    tied = fuse_lists([{"z": 1.0, "y": 0.0}, {"y": 1.0, "z": 0.0}], method="weighted")
    assert tied == [("y", 1.0), ("z", 1.0)]


def test_the_two_methods_can_disagree_where_score_gaps_matter():
    # c is a close second in both lists; a and b each win one list by far and are nowhere in the other.
    # The weighted sum keeps the gaps and puts c first; RRF sees only ranks: 2 + 2 loses to 1 + 3.
    vector = {"a": 0.90, "c": 0.85, "b": 0.10}
    bm25 = {"b": 10.0, "c": 9.9, "a": 0.1}
    assert fuse_lists([vector, bm25], method="weighted", k=1)[0][0] == "c"
    assert [i for i, _ in fuse_lists([vector, bm25], method="rrf")] == ["a", "b", "c"]


def test_fuse_lists_cuts_at_k_and_refuses_bad_arguments():
    assert len(fuse_lists([VECTOR, BM25], method="rrf", k=2)) == 2
    assert fuse_lists([{}, {}], method="weighted") == []
    with pytest.raises(ValueError, match="unknown fusion method"):
        fuse_lists([VECTOR], method="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weights"):
        rrf([VECTOR, BM25], weights=[1.0])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_sum([VECTOR, BM25], weights=[1.0, -1.0])


def test_each_list_contributes_at_least_a_hundred_candidates():
    assert hybrid_depth(10) == 100 and hybrid_depth(80) == 160
