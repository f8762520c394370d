"""Reranking groups with hard negatives: the dual encoder's top-ranked wrong products for each query."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
from tqdm.auto import tqdm

from trainer.cross_encoder.data import QUERY_KINDS, QueryMaker, RerankGroup, is_relevant
from trainer.cross_encoder.knowledge import AttributeSchema
from vitrine.catalog.product import Product
from vitrine.scoring import blend_product_vectors

BLOCK = 1024
# Protocol-drawn groups: title queries rank images alone (as sample T2I does), shopper queries rank titled products (T2P).
PROTOCOL_KINDS = ("title", "shopper")


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
    protocol: bool = False,
) -> list[RerankGroup]:
    """`count` groups over random (product, query kind) pairs. Groups without titles rank candidates
    by image similarity (text-to-image reranking); groups with titles by the α-fused product score.
    With `protocol`, groups are drawn as the evaluation's protocols are: title queries against images
    alone (sample T2I) and shopper queries against titled products (T2P), half each."""
    n = len(products)
    assert text_embs.shape == image_embs.shape and text_embs.shape[0] == n
    if n < negatives + 2:
        raise ValueError(f"need more than {negatives + 1} products to mine {negatives} negatives")
    rng = np.random.default_rng([seed, 23])
    picks = rng.integers(n, size=count)
    drawn = PROTOCOL_KINDS if protocol else QUERY_KINDS
    kinds = [drawn[int(k)] for k in rng.integers(len(drawn), size=count)]
    made = [maker.make(products[int(i)], kind, rng) for i, kind in zip(picks, kinds)]
    with_titles = np.asarray([k == "shopper" for k in kinds]) if protocol else rng.random(count) >= title_drop
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
            groups.append(RerankGroup(query, int(picks[g]), chosen, bool(with_titles[g]), swapped, first, q_embs[g]))
    swapped_at = [k for k, g in enumerate(groups) if g.swapped_query is not None]
    if swapped_at:  # aligned models read the swapped query's own embedding
        texts = [groups[k].swapped_query for k in swapped_at]
        embs = np.concatenate([encode_texts(texts[s : s + 256]) for s in range(0, len(texts), 256)])
        for k, e in zip(swapped_at, embs):
            groups[k] = replace(groups[k], swapped_embedding=np.asarray(e, dtype=np.float32))
    return groups


def tia_hard_negatives(
    titles: Sequence[str], title_embs: np.ndarray, image_embs: np.ndarray, k: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """The dual encoder's hard negatives for image-text matching: ([N, k] the top-ranked images of
    products with another title, for each title; [N, k] the top-ranked other titles, for each image).
    Products sharing a title are right answers of each other, never negatives."""
    n = len(titles)
    assert title_embs.shape == image_embs.shape and title_embs.shape[0] == n
    keys = np.unique([t.strip().lower() for t in titles], return_inverse=True)[1]
    if np.unique(keys).size <= k:
        raise ValueError(f"need more than {k} distinct titles to mine {k} hard negatives")
    depth = min(n, 4 * k + 16)
    out = []
    for queries, keys_side in ((title_embs, image_embs), (image_embs, title_embs)):
        hard = np.empty((n, k), np.int64)
        for start in range(0, n, BLOCK):
            sims = queries[start : start + BLOCK] @ keys_side.T
            for r in range(sims.shape[0]):
                i = start + r
                row = sims[r].copy()
                row[keys == keys[i]] = -np.inf
                top = np.argpartition(-row, depth - 1)[:depth]
                top = top[np.argsort(-row[top])]
                got = top[np.isfinite(row[top])][:k]
                hard[i] = np.resize(got, k)  # a title shared by most of the top: repeat the few left
        out.append(hard)
    return out[0], out[1]


__all__ = ["mine_groups", "tia_hard_negatives"]
