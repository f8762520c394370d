"""Marqo's KAGL protocol (text-to-image on a product catalog), so results line up with the public
leaderboard of fashion embedding models.

    queries:  up to 2,000 seeded distinct titles of the split
    gallery:  every image of the split, or of a second catalog given as the gallery
    relevant: every gallery product whose title is exactly the query
    metrics:  BEIR-style recall@1 and @10 (the share of the relevant found) and MRR@10

For reference, Marqo-FashionSigLIP reports R@1 17.9, R@10 48.9, MRR 29.3 on the 44k-product KAGL
gallery, zero-shot. A smaller gallery (our test split) is easier: compare like with like.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vitrine.evaluation.protocols import QUERY_BLOCK
from vitrine.evaluation.ranking import ranked_relevance

KAGL_QUERIES = 2000
KAGL_KS = (1, 10)
MRR_K = 10


def kagl_query_texts(titles: Sequence[str], num_queries: int = KAGL_QUERIES, seed: int = 0) -> list[str]:
    """Up to `num_queries` distinct titles, seeded, in sorted order (independent of product order)."""
    distinct = sorted(set(titles))
    rng = np.random.default_rng([seed, 41])
    picks = np.sort(rng.choice(len(distinct), size=min(num_queries, len(distinct)), replace=False))
    return [distinct[i] for i in picks]


def kagl_metrics(query_embs: np.ndarray, query_texts: Sequence[str], gallery_embs: np.ndarray,
                 gallery_titles: Sequence[str]) -> dict:  # fmt: skip
    """Recall@1/@10 (relevant found / relevant) and MRR@10 of text queries against a gallery of images.

    Ties count against the model (as in every Vitrine protocol). A query with no relevant product
    in the gallery is skipped and counted.
    """
    assert query_embs.shape == (len(query_texts), gallery_embs.shape[1]), (query_embs.shape, gallery_embs.shape)
    assert gallery_embs.shape[0] == len(gallery_titles), (gallery_embs.shape, len(gallery_titles))
    titles = np.asarray(gallery_titles, dtype=object)
    k = max(*KAGL_KS, MRR_K)
    found: dict[int, list[np.ndarray]] = {kk: [] for kk in KAGL_KS}
    reciprocal: list[np.ndarray] = []
    relevant_counts: list[np.ndarray] = []
    skipped = 0
    for start in range(0, len(query_texts), QUERY_BLOCK):
        block = list(query_texts[start : start + QUERY_BLOCK])
        relevant = titles[None, :] == np.asarray(block, dtype=object)[:, None]
        n_relevant = relevant.sum(axis=1)
        keep = n_relevant > 0
        skipped += int((~keep).sum())
        if not keep.any():
            continue
        hits = ranked_relevance(query_embs[start : start + len(block)][keep] @ gallery_embs.T, relevant[keep], k)
        for kk in KAGL_KS:
            found[kk].append(hits[:, :kk].sum(axis=1) / n_relevant[keep])
        first = np.where(hits[:, :MRR_K].any(axis=1), hits[:, :MRR_K].argmax(axis=1) + 1, np.inf)
        reciprocal.append(1.0 / first)
        relevant_counts.append(n_relevant[keep])
    if not reciprocal:
        return {"queries": 0, "skipped_no_relevant": skipped}
    metrics: dict = {f"R@{kk}": float(np.concatenate(found[kk]).mean()) for kk in KAGL_KS}
    metrics[f"MRR@{MRR_K}"] = float(np.concatenate(reciprocal).mean())
    metrics["queries"] = int(sum(len(r) for r in reciprocal))
    metrics["skipped_no_relevant"] = skipped
    metrics["gallery"] = int(gallery_embs.shape[0])
    metrics["median_relevant_per_query"] = float(np.median(np.concatenate(relevant_counts)))
    return metrics
