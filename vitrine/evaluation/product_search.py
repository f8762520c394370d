"""Product search metrics as a shop runs it (FashionKLIP §5): a query ranks whole products by the
fused score of `vitrine.scoring`.

T2P: shopper queries (`vitrine.evaluation.queries`); relevant = every product matching all named
attributes. I2P: shopper photos (`vitrine.evaluation.photos`); relevant = that product.
"""

from __future__ import annotations

import numpy as np

from vitrine.evaluation.protocols import QUERY_BLOCK, recall_metrics
from vitrine.evaluation.ranking import (
    capped_recall_at_k,
    ndcg_at_k,
    precision_at_k,
    rank_of_positive,
    ranked_relevance,
)
from vitrine.scoring import blend_product_vectors

I2P_KS = (1, 5, 10, 20)

def t2p_metrics(
    query_embs: np.ndarray, relevant: np.ndarray, title_embs: np.ndarray, image_embs: np.ndarray, alpha: float
) -> dict:
    """P@1, P@10, nDCG@10 (binary gains) and capped R@10, averaged over queries (ties against)."""
    assert query_embs.shape[0] == relevant.shape[0] and relevant.shape[1] == title_embs.shape[0]
    n_relevant = relevant.sum(axis=1)
    assert (n_relevant >= 1).all(), "every shopper query needs at least one relevant product"
    products = blend_product_vectors(title_embs, image_embs, alpha)
    per_query: dict[str, list[np.ndarray]] = {"P@1": [], "P@10": [], "nDCG@10": [], "R@10_capped": []}
    for start in range(0, query_embs.shape[0], QUERY_BLOCK):
        block = slice(start, start + QUERY_BLOCK)
        hits = ranked_relevance(query_embs[block] @ products.T, relevant[block], 10)
        per_query["P@1"].append(precision_at_k(hits, 1))
        per_query["P@10"].append(precision_at_k(hits, 10))
        per_query["nDCG@10"].append(ndcg_at_k(hits, n_relevant[block], 10))
        per_query["R@10_capped"].append(capped_recall_at_k(hits, n_relevant[block], 10))
    metrics: dict = {name: float(np.concatenate(values).mean()) for name, values in per_query.items()}
    metrics["queries"] = int(query_embs.shape[0])
    metrics["median_relevant_per_query"] = float(np.median(n_relevant))
    metrics["R@10_capped_definition"] = "relevant products in the top 10 / min(10, relevant products)"
    return metrics


def i2p_metrics(
    query_embs: np.ndarray, targets: np.ndarray, title_embs: np.ndarray, image_embs: np.ndarray, alpha: float
) -> dict:
    """R@1/5/10/20 of each photo's own product among all products (ties against)."""
    assert query_embs.shape[0] == targets.shape[0], (query_embs.shape, targets.shape)
    products = blend_product_vectors(title_embs, image_embs, alpha)
    ranks = np.concatenate(
        [
            rank_of_positive(
                query_embs[start : start + QUERY_BLOCK] @ products.T, targets[start : start + QUERY_BLOCK]
            )
            for start in range(0, query_embs.shape[0], QUERY_BLOCK)
        ]
    )
    metrics = recall_metrics(ranks, ks=I2P_KS)
    metrics["candidates_per_query"] = int(title_embs.shape[0])
    return metrics
