"""Cross-modal retrieval protocols on precomputed embeddings (pure numpy).

Two directions: T2I (a product text ranks images) and I2T (a product image ranks texts).

* sample: the Fashion-Gen protocol of FashionBERT / KaleidoBERT / FashionKLIP. Each of
  N seeded queries ranks its ground truth among 1 + K candidates, the K negatives drawn
  from the query product's subcategory (topped up from the whole split when the
  subcategory is too small). Negatives never carry the query's exact text.
* full: every query against every candidate of the split. Relevance is by text: several
  products can share one title, and all of them are correct answers.

Ties count against the model throughout (see ranking.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vitrine.evaluation.ranking import (
    rank_against_negatives,
    rank_of_best_relevant,
    rank_of_positive,
    recall_at_k,
    recall_curve,
)

RECALL_KS = (1, 5, 10)
CURVE_MAX_K = 20
# Queries scored per matrix product: 256 x 16k float32 is 16 MB, never the full n x n matrix.
QUERY_BLOCK = 256


@dataclass(frozen=True)
class RetrievalSet:
    """One split as embeddings: one image per product, and the split's distinct texts.

    texts: the distinct product texts; text_of_product[i] indexes the text of product i.
    groups: the subcategory of each product (sample-protocol negatives come from it).
    """

    texts: list[str]
    text_of_product: np.ndarray  # (n,) int
    groups: list[str]  # (n,)
    text_embs: np.ndarray  # (t, d) float32
    image_embs: np.ndarray  # (n, d) float32

    def __post_init__(self) -> None:
        n, t = len(self.groups), len(self.texts)
        assert self.text_of_product.shape == (n,), (self.text_of_product.shape, n)
        assert self.image_embs.ndim == 2 and self.image_embs.shape[0] == n, (self.image_embs.shape, n)
        assert self.text_embs.shape == (t, self.image_embs.shape[1]), (
            self.text_embs.shape,
            self.image_embs.shape,
        )
        assert n == 0 or (0 <= self.text_of_product.min() and self.text_of_product.max() < t)

    @property
    def num_products(self) -> int:
        return len(self.groups)

    @property
    def title_embs(self) -> np.ndarray:
        """(n, d): each product's text embedding."""
        return self.text_embs[self.text_of_product]


def index_distinct(values: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Distinct values in first-seen order, and each input's index into them."""
    index: dict[str, int] = {}
    of_product = np.array([index.setdefault(text, len(index)) for text in values], dtype=np.int64)
    return list(index), of_product


def recall_metrics(ranks: np.ndarray, ks: Sequence[int] = RECALL_KS, max_k: int = CURVE_MAX_K) -> dict:
    """R@k for each k, the median 1-based rank, and the R@1..max_k curve."""
    metrics: dict = {f"R@{k}": recall_at_k(ranks, k) for k in ks}
    metrics["median_rank"] = float(np.median(ranks) + 1)
    metrics["queries"] = int(ranks.size)
    metrics["recall_curve"] = recall_curve(ranks, max_k)
    return metrics


# ---------------------------------------------------------------- sample protocol


@dataclass(frozen=True)
class SampledCandidates:
    """Per query: the query row, its ground-truth candidate and K negatives (-1 pads short rows)."""

    queries: np.ndarray  # (q,) query embedding rows
    positives: np.ndarray  # (q,) candidate rows of the ground truth
    negatives: np.ndarray  # (q, K) candidate rows, -1 where the split had too few
    topped_up: int  # queries whose subcategory was too small, topped up from the whole split
    short: int  # queries with fewer than K negatives even after the top-up


def _draw_negatives(
    rng: np.random.Generator, in_group: np.ndarray, top_up_pool, k: int
) -> tuple[np.ndarray, bool, bool]:
    """k distinct negatives: from `in_group` first, then from `top_up_pool()` (computed only if needed)."""
    if in_group.size >= k:
        return rng.choice(in_group, size=k, replace=False), False, False
    pool = top_up_pool()
    extra = rng.choice(pool, size=min(k - in_group.size, pool.size), replace=False)
    chosen = np.concatenate([rng.permutation(in_group), extra])
    return chosen, True, chosen.size < k


def _pad(rows: list[np.ndarray], k: int) -> np.ndarray:
    out = np.full((len(rows), k), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : row.size] = row
    return out


def _group_members(groups: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Each product's group code, and the product indices of each group (by code)."""
    _, codes = index_distinct(groups)
    return codes, [np.flatnonzero(codes == c) for c in range(int(codes.max()) + 1 if codes.size else 0)]


def sample_query_products(num_products: int, num_queries: int, seed: int) -> np.ndarray:
    """min(num_queries, num_products) distinct product indices, in seeded random order."""
    rng = np.random.default_rng([seed, 0])
    return rng.choice(num_products, size=min(num_queries, num_products), replace=False)


def sample_t2i_candidates(
    text_of_product: np.ndarray,
    groups: Sequence[str],
    query_products: np.ndarray,
    num_negatives: int,
    seed: int,
) -> SampledCandidates:
    """T2I: query = the product's text; negatives = images of same-subcategory products of another text."""
    rng = np.random.default_rng([seed, 1])
    codes, members = _group_members(groups)
    rows, topped_up, short = [], 0, 0
    for p in query_products:
        own_text, code = text_of_product[p], codes[p]
        same = members[code]
        in_group = same[text_of_product[same] != own_text]

        def pool(code=code, own_text=own_text) -> np.ndarray:
            # Everything outside the subcategory with a different text (the in-group ones are all taken).
            return np.flatnonzero((codes != code) & (text_of_product != own_text))

        chosen, was_topped_up, was_short = _draw_negatives(rng, in_group, pool, num_negatives)
        rows.append(chosen)
        topped_up += was_topped_up
        short += was_short
    return SampledCandidates(
        queries=text_of_product[query_products],
        positives=np.asarray(query_products, dtype=np.int64),
        negatives=_pad(rows, num_negatives),
        topped_up=topped_up,
        short=short,
    )


def sample_i2t_candidates(
    text_of_product: np.ndarray,
    groups: Sequence[str],
    query_products: np.ndarray,
    num_negatives: int,
    seed: int,
) -> SampledCandidates:
    """I2T: query = the product's image; negatives = distinct same-subcategory texts other than its own."""
    rng = np.random.default_rng([seed, 2])
    codes, members = _group_members(groups)
    group_texts = [np.unique(text_of_product[m]) for m in members]
    num_texts = int(text_of_product.max()) + 1 if text_of_product.size else 0
    rows, topped_up, short = [], 0, 0
    for p in query_products:
        own_text, texts = text_of_product[p], group_texts[codes[p]]
        in_group = texts[texts != own_text]

        def pool(texts=texts) -> np.ndarray:
            # Texts that no product of the subcategory carries (this excludes the query's own text).
            return np.setdiff1d(np.arange(num_texts), texts, assume_unique=True)

        chosen, was_topped_up, was_short = _draw_negatives(rng, in_group, pool, num_negatives)
        rows.append(chosen)
        topped_up += was_topped_up
        short += was_short
    return SampledCandidates(
        queries=np.asarray(query_products, dtype=np.int64),
        positives=text_of_product[query_products],
        negatives=_pad(rows, num_negatives),
        topped_up=topped_up,
        short=short,
    )


def sampled_ranks(
    query_embs: np.ndarray, candidate_embs: np.ndarray, sampled: SampledCandidates
) -> np.ndarray:
    """Rank of each query's ground truth among its own sampled candidates (ties against)."""
    q_all = query_embs[sampled.queries]
    pos_all = candidate_embs[sampled.positives]
    ranks = []
    for start in range(0, len(sampled.queries), QUERY_BLOCK):
        block = slice(start, start + QUERY_BLOCK)
        q, negatives = q_all[block], sampled.negatives[block]
        positive_scores = np.einsum("bd,bd->b", q, pos_all[block])
        negative_scores = np.einsum("bd,bkd->bk", q, candidate_embs[np.maximum(negatives, 0)])
        negative_scores[negatives < 0] = -np.inf
        ranks.append(rank_against_negatives(positive_scores, negative_scores))
    return np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)


def sample_protocol(
    data: RetrievalSet, *, num_queries: int = 1000, num_negatives: int = 100, seed: int = 0
) -> dict:
    """Both directions of the sample protocol: {"t2i": metrics, "i2t": metrics}."""
    if data.num_products < 2:
        raise ValueError("the sample protocol needs at least 2 products")
    query_products = sample_query_products(data.num_products, num_queries, seed)
    results = {}
    for direction, sample, query_embs, candidate_embs in (
        ("t2i", sample_t2i_candidates, data.text_embs, data.image_embs),
        ("i2t", sample_i2t_candidates, data.image_embs, data.text_embs),
    ):
        sampled = sample(data.text_of_product, data.groups, query_products, num_negatives, seed)
        ranks = sampled_ranks(query_embs, candidate_embs, sampled)
        metrics = recall_metrics(ranks)
        metrics.update(
            candidates_per_query=1 + num_negatives,
            topped_up_queries=sampled.topped_up,
            short_queries=sampled.short,
        )
        results[direction] = metrics
    return results


# ---------------------------------------------------------------- full protocol


def full_t2i_ranks(text_embs: np.ndarray, image_embs: np.ndarray, text_of_product: np.ndarray) -> np.ndarray:
    """Each distinct text against every image; relevant = images of products carrying exactly that text."""
    ranks = []
    for start in range(0, text_embs.shape[0], QUERY_BLOCK):
        query_ids = np.arange(start, min(start + QUERY_BLOCK, text_embs.shape[0]))
        scores = text_embs[query_ids] @ image_embs.T
        relevant = text_of_product[None, :] == query_ids[:, None]
        ranks.append(rank_of_best_relevant(scores, relevant))
    return np.concatenate(ranks)


def full_i2t_ranks(image_embs: np.ndarray, text_embs: np.ndarray, text_of_product: np.ndarray) -> np.ndarray:
    """Each product image against every distinct text; relevant = its own text."""
    ranks = []
    for start in range(0, image_embs.shape[0], QUERY_BLOCK):
        block = slice(start, start + QUERY_BLOCK)
        scores = image_embs[block] @ text_embs.T
        ranks.append(rank_of_positive(scores, text_of_product[block]))
    return np.concatenate(ranks)


def full_protocol(data: RetrievalSet) -> dict:
    """Both directions of the full protocol: {"t2i": metrics, "i2t": metrics}."""
    if data.num_products < 2:
        raise ValueError("the full protocol needs at least 2 products")
    t2i = recall_metrics(full_t2i_ranks(data.text_embs, data.image_embs, data.text_of_product))
    t2i["candidates_per_query"] = data.num_products
    i2t = recall_metrics(full_i2t_ranks(data.image_embs, data.text_embs, data.text_of_product))
    i2t["candidates_per_query"] = len(data.texts)
    return {"t2i": t2i, "i2t": i2t}
