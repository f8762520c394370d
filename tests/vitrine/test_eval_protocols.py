"""Sample and full retrieval protocols on hand-built embeddings with known ranks."""

from __future__ import annotations

import numpy as np
import pytest

from vitrine.evaluation.protocols import (
    RetrievalSet,
    full_i2t_ranks,
    full_protocol,
    full_t2i_ranks,
    index_distinct,
    sample_i2t_candidates,
    sample_protocol,
    sample_query_products,
    sample_t2i_candidates,
    sampled_ranks,
)


def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def make_set(
    texts: list[str], groups: list[str], text_embs: np.ndarray, image_embs: np.ndarray
) -> RetrievalSet:
    distinct, of_product = index_distinct(texts)
    assert len(distinct) == len(text_embs)
    return RetrievalSet(distinct, of_product, groups, text_embs, image_embs)


def perfect_set(n: int, groups: list[str], texts: list[str] | None = None, seed: int = 0) -> RetrievalSet:
    """Each image embeds exactly like its product's text: a perfect encoder."""
    texts = texts or [f"product {i}" for i in range(n)]
    distinct, of_product = index_distinct(texts)
    text_embs = unit(np.random.default_rng(seed).normal(size=(len(distinct), 16)))
    return RetrievalSet(distinct, of_product, groups, text_embs, text_embs[of_product].copy())


def test_index_distinct_keeps_first_seen_order():
    distinct, of_product = index_distinct(["b", "a", "b", "c", "a"])
    assert distinct == ["b", "a", "c"]
    assert of_product.tolist() == [0, 1, 0, 2, 1]


# ---------------------------------------------------------------- full protocol


def test_full_t2i_relevance_is_by_text_duplicates_all_count():
    # Products 0 and 1 share the title "a"; product 2 is "b".
    texts = ["a", "a", "b"]
    text_embs = unit([[1, 0, 0], [0, 1, 0]])  # "a", "b"
    image_embs = unit([[0, 0, 1], [1, 0, 0], [0.5, 1, 0]])  # p0 unlike anything; p1 is exactly "a"
    data = make_set(texts, ["x"] * 3, text_embs, image_embs)
    ranks = full_t2i_ranks(data.text_embs, data.image_embs, data.text_of_product)
    # "a": best relevant is p1 (1.0) -> rank 0 although p0 scores 0; "b": p2 scores highest -> 0
    assert ranks.tolist() == [0, 0]
    # Shuffle p1's image to be poor: "a" now relies on p0 and p2 (non-relevant) beats it.
    image_embs2 = unit([[0.6, 0, 0.8], [0, 0, 1], [0.8, 0.6, 0]])
    ranks2 = full_t2i_ranks(text_embs, image_embs2, data.text_of_product)
    assert ranks2.tolist() == [1, 0]


def test_full_i2t_queries_every_image_against_distinct_texts():
    texts = ["a", "a", "b"]
    text_embs = unit([[1, 0], [0, 1]])
    image_embs = unit([[1, 0.1], [0.1, 1], [0.2, 1]])  # p1 looks like "b" although titled "a"
    ranks = full_i2t_ranks(image_embs, text_embs, index_distinct(texts)[1])
    assert ranks.tolist() == [0, 1, 0]


def test_full_protocol_counts_ties_against_a_constant_encoder():
    n = 12
    texts = [f"t{i // 2}" for i in range(n)]  # 6 distinct texts, 2 products each
    const = unit(np.ones((1, 4)))
    data = make_set(texts, ["g"] * n, np.repeat(const, 6, axis=0), np.repeat(const, n, axis=0))
    result = full_protocol(data)
    assert result["t2i"]["R@10"] == 0.0  # 10 non-relevant images tie with the relevant ones
    assert result["t2i"]["median_rank"] == 11.0
    assert result["i2t"]["R@5"] == 0.0 and result["i2t"]["median_rank"] == 6.0
    assert result["t2i"]["queries"] == 6 and result["t2i"]["candidates_per_query"] == 12
    assert result["i2t"]["queries"] == 12 and result["i2t"]["candidates_per_query"] == 6


def test_full_protocol_perfect_encoder_with_duplicate_texts():
    texts = ["red top", "red top", "blue top", "shoe", "shoe", "shoe", "bag"]
    data = perfect_set(len(texts), ["g"] * len(texts), texts)
    result = full_protocol(data)
    assert result["t2i"]["R@1"] == 1.0 and result["i2t"]["R@1"] == 1.0


def test_full_protocol_blocks_give_the_same_ranks(monkeypatch):
    rng = np.random.default_rng(3)
    n = 40
    texts = [f"t{rng.integers(0, 25)}" for _ in range(n)]
    distinct, of_product = index_distinct(texts)
    text_embs, image_embs = unit(rng.normal(size=(len(distinct), 8))), unit(rng.normal(size=(n, 8)))
    expected_t2i = full_t2i_ranks(text_embs, image_embs, of_product)
    expected_i2t = full_i2t_ranks(image_embs, text_embs, of_product)
    monkeypatch.setattr("vitrine.evaluation.protocols.QUERY_BLOCK", 7)
    assert full_t2i_ranks(text_embs, image_embs, of_product).tolist() == expected_t2i.tolist()
    assert full_i2t_ranks(image_embs, text_embs, of_product).tolist() == expected_i2t.tolist()


# ---------------------------------------------------------------- sample protocol


def groups_and_texts():
    # Group "tops": 30 products, 10 of them share "plain tee"; group "bags": 5 products.
    texts = ["plain tee"] * 10 + [f"top {i}" for i in range(20)] + [f"bag {i}" for i in range(5)]
    groups = ["tops"] * 30 + ["bags"] * 5
    return texts, groups


def test_sample_t2i_negatives_never_carry_the_query_text_and_are_distinct():
    texts, groups = groups_and_texts()
    _, of_product = index_distinct(texts)
    queries = np.arange(len(texts))
    sampled = sample_t2i_candidates(of_product, groups, queries, num_negatives=15, seed=1)
    for p, negatives in zip(queries, sampled.negatives):
        negatives = negatives[negatives >= 0]
        assert p not in negatives  # the ground truth only appears as the positive
        assert len(set(negatives.tolist())) == len(negatives)
        assert not (of_product[negatives] == of_product[p]).any()
    assert sampled.positives.tolist() == queries.tolist()
    assert sampled.queries.tolist() == of_product[queries].tolist()


def test_sample_t2i_tops_up_small_subcategories_and_counts_them():
    texts, groups = groups_and_texts()
    _, of_product = index_distinct(texts)
    queries = np.arange(len(texts))
    sampled = sample_t2i_candidates(of_product, groups, queries, num_negatives=15, seed=1)
    # "plain tee" queries have 20 eligible tops; other tops have 29 - 0 ... >= 15; bags have 4 -> top-up
    assert sampled.topped_up == 5 and sampled.short == 0
    for p in range(30, 35):
        negatives = sampled.negatives[p]
        assert (negatives >= 0).all()
        in_group = [n for n in negatives if groups[n] == "bags"]
        assert len(in_group) == 4  # every other bag is used before topping up
    for p in range(30):
        assert all(groups[n] == "tops" for n in sampled.negatives[p])


def test_sample_counts_short_queries_when_the_whole_split_is_too_small():
    texts, groups = groups_and_texts()
    _, of_product = index_distinct(texts)
    sampled = sample_t2i_candidates(of_product, groups, np.array([0, 30]), num_negatives=100, seed=0)
    assert sampled.topped_up == 2 and sampled.short == 2
    # "plain tee" (10 products) has 25 other products; bag 0 has 34
    assert (sampled.negatives[0] >= 0).sum() == 25
    assert (sampled.negatives[1] >= 0).sum() == 34


def test_sample_i2t_negatives_are_distinct_texts_other_than_the_query_text():
    texts, groups = groups_and_texts()
    distinct, of_product = index_distinct(texts)
    queries = np.arange(len(texts))
    sampled = sample_i2t_candidates(of_product, groups, queries, num_negatives=15, seed=2)
    for p, negatives in zip(queries, sampled.negatives):
        assert len(set(negatives.tolist())) == 15
        assert of_product[p] not in negatives
        assert (negatives >= 0).all() and (negatives < len(distinct)).all()
    assert sampled.positives.tolist() == of_product.tolist()
    # tops have 21 distinct texts (20 eligible per "plain tee" query): enough; bags: 4 -> topped up
    assert sampled.topped_up == 5


def test_sampling_is_reproducible_by_seed():
    texts, groups = groups_and_texts()
    _, of_product = index_distinct(texts)
    q1 = sample_query_products(len(texts), 20, seed=7)
    q2 = sample_query_products(len(texts), 20, seed=7)
    assert q1.tolist() == q2.tolist() and len(set(q1.tolist())) == 20
    assert sample_query_products(len(texts), 20, seed=8).tolist() != q1.tolist()
    a = sample_t2i_candidates(of_product, groups, q1, 10, seed=7)
    b = sample_t2i_candidates(of_product, groups, q1, 10, seed=7)
    c = sample_t2i_candidates(of_product, groups, q1, 10, seed=8)
    assert np.array_equal(a.negatives, b.negatives)
    assert not np.array_equal(a.negatives, c.negatives)
    assert sample_query_products(len(texts), 1000, seed=0).size == len(texts)  # fewer if the split is smaller


def test_sampled_ranks_match_hand_computed_scores():
    # 1-d-ish embeddings so every score is known: query . candidate
    query_embs = unit([[1, 0], [0, 1]])
    candidate_embs = unit([[1, 0], [0.6, 0.8], [0.8, 0.6], [0, 1], [1, 0]])
    from vitrine.evaluation.protocols import SampledCandidates

    sampled = SampledCandidates(
        queries=np.array([0, 1]),
        positives=np.array([2, 3]),
        negatives=np.array([[0, 1, 4], [0, 1, -1]]),
        topped_up=0,
        short=1,
    )
    # query 0 -> positive 0.8; negatives 1.0, 0.6, 1.0 -> rank 2. query 1 -> positive 1.0 -> rank 0
    assert sampled_ranks(query_embs, candidate_embs, sampled).tolist() == [2, 0]


def test_sample_protocol_perfect_and_constant_encoders():
    texts, groups = groups_and_texts()
    perfect = sample_protocol(
        perfect_set(len(texts), groups, texts), num_queries=20, num_negatives=15, seed=0
    )
    assert perfect["t2i"]["R@1"] == 1.0 and perfect["i2t"]["R@1"] == 1.0

    distinct, of_product = index_distinct(texts)
    const = unit(np.ones((1, 3)))
    data = RetrievalSet(
        distinct, of_product, groups, np.repeat(const, len(distinct), 0), np.repeat(const, len(texts), 0)
    )
    flat = sample_protocol(data, num_queries=20, num_negatives=15, seed=0)
    for direction in ("t2i", "i2t"):
        assert flat[direction]["R@10"] == 0.0  # all 15 negatives tie with the ground truth
        assert flat[direction]["median_rank"] == 16.0
        assert flat[direction]["candidates_per_query"] == 16
        assert flat[direction]["queries"] == 20


def test_sample_protocol_is_deterministic_and_reports_top_ups():
    texts, groups = groups_and_texts()
    distinct, of_product = index_distinct(texts)
    rng = np.random.default_rng(0)
    data = RetrievalSet(
        distinct,
        of_product,
        groups,
        unit(rng.normal(size=(len(distinct), 8))),
        unit(rng.normal(size=(len(texts), 8))),
    )
    first = sample_protocol(data, num_queries=35, num_negatives=15, seed=4)
    assert first == sample_protocol(data, num_queries=35, num_negatives=15, seed=4)
    assert first["t2i"]["topped_up_queries"] == 5 and first["i2t"]["topped_up_queries"] == 5
    for direction in ("t2i", "i2t"):
        assert 0.0 <= first[direction]["R@1"] <= first[direction]["R@5"] <= first[direction]["R@10"] <= 1.0


def test_retrieval_set_checks_shapes():
    with pytest.raises(AssertionError):
        RetrievalSet(["a"], np.array([0, 0]), ["g", "g"], unit([[1, 0]]), unit([[1, 0]]))
    with pytest.raises(ValueError):
        sample_protocol(perfect_set(1, ["g"]))


def test_kagl_metrics_are_beir_recall_and_mrr_on_hand_made_rankings():
    from vitrine.evaluation.kagl import kagl_metrics, kagl_query_texts

    # Gallery: 4 products; titles A, A, B, C. Query A's relevant: rows 0 and 1; query B's: row 2.
    gallery = np.eye(4, dtype=np.float32)
    titles = ["A", "A", "B", "C"]
    queries = np.array([[0.1, 0.9, 0.5, 0.0],  # A: ranks row 1 first (relevant), row 2, then row 0
                        [0.0, 0.0, 0.2, 0.9]], dtype=np.float32)  # B: row 3 first (wrong), row 2 second
    m = kagl_metrics(queries, ["A", "B"], gallery, titles)
    assert m["R@1"] == pytest.approx((0.5 + 0.0) / 2)  # A finds 1 of its 2 relevant at rank 1
    assert m["R@10"] == pytest.approx(1.0)
    assert m["MRR@10"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["queries"] == 2 and m["gallery"] == 4
    # A query without any relevant product in the gallery is counted, not scored.
    assert kagl_metrics(queries[:1], ["Z"], gallery, titles) == {"queries": 0, "skipped_no_relevant": 1}
    # Ties count against the model: an all-equal score row puts the relevant last.
    tied = kagl_metrics(np.zeros((1, 4), np.float32), ["B"], gallery, titles)
    assert tied["R@1"] == 0.0 and tied["MRR@10"] == pytest.approx(1 / 4)
    picks = kagl_query_texts(["x", "y", "y", "z"], 2, seed=3)
    assert picks == sorted(picks) and len(set(picks)) == 2 and picks == kagl_query_texts(["z", "y", "x"], 2, seed=3)
