"""Reranking groups with hard negatives: the dual encoder's top-ranked wrong products for each query."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from trainer.cross_encoder.data import QUERY_KINDS, QueryMaker, RerankGroup, is_relevant
from trainer.cross_encoder.knowledge import AttributeSchema
from vitrine.catalog.product import Product
from vitrine.scoring import blend_product_vectors

BLOCK = 1024


def mine_groups(
    products: Sequence[Product],
    text_embs: np.ndarray,
    image_embs: np.ndarray,
    encode_texts: Callable[[list[str]], np.ndarray],
    maker: QueryMaker,
    schema: AttributeSchema,
    *,
    count: int,
    alpha_t2p: float,
    negatives: int = 7,
    pool: int = 30,
    title_drop: float = 0.5,
    knowledge: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> list[RerankGroup]:
    """`count` groups over random (product, query kind) pairs. Groups without titles rank candidates
    by image similarity (text-to-image reranking); groups with titles by the α-fused product score."""
    n = len(products)
    assert text_embs.shape == image_embs.shape and text_embs.shape[0] == n
    if n < negatives + 2:
        raise ValueError(f"need more than {negatives + 1} products to mine {negatives} negatives")
    rng = np.random.default_rng([seed, 23])
    picks = rng.integers(n, size=count)
    kinds = [QUERY_KINDS[int(k)] for k in rng.integers(len(QUERY_KINDS), size=count)]
    made = [maker.make(products[int(i)], kind, rng) for i, kind in zip(picks, kinds)]
    with_titles = rng.random(count) >= title_drop
    queries = [q for q, _ in made]
    q_embs = np.concatenate([encode_texts(queries[s : s + 256]) for s in range(0, count, 256)])
    assert q_embs.shape == (count, text_embs.shape[1])
    fused = blend_product_vectors(text_embs, image_embs, alpha_t2p)
    depth = min(n, pool * 3 + 10)
    groups: list[RerankGroup] = []
    for start in tqdm(range(0, count, BLOCK), desc="hard negatives", disable=not progress):
        block = slice(start, start + BLOCK)
        sims_img = q_embs[block] @ image_embs.T
        sims_fused = q_embs[block] @ fused.T
        for r, g in enumerate(range(start, min(start + BLOCK, count))):
            sims = sims_fused[r] if with_titles[g] else sims_img[r]
            top = np.argpartition(-sims, depth - 1)[:depth]
            top = top[np.argsort(-sims[top])]
            query, filters = made[g]
            wrong = [int(j) for j in top if j != picks[g] and not is_relevant(query, filters, products[j], maker, kinds[g])][:pool]
            if len(wrong) < negatives:  # a query matching most of the catalog: fill with random wrong products
                others = [j for j in rng.permutation(n)[: negatives * 20] if j != picks[g] and not is_relevant(query, filters, products[j], maker, kinds[g])]
                wrong += [int(j) for j in others if j not in wrong]
            chosen = tuple(int(j) for j in rng.choice(wrong[:max(pool, negatives)], size=negatives, replace=False))
            swapped = schema.swap(query, rng) if knowledge else None
            first = tuple(float(sims[j]) for j in (picks[g], *chosen))
            groups.append(RerankGroup(query, int(picks[g]), chosen, bool(with_titles[g]), swapped, first))
    return groups


__all__ = ["mine_groups"]
